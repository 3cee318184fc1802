"""Token counts with tiktoken, with its encodings loaded offline.

tiktoken downloads an encoding's BPE file on first use. batcher runs where there may be no
network, so it takes the files from the ``bpe-openai`` package, which ships them, and places them
in tiktoken's cache (``$TIKTOKEN_CACHE_DIR`` if set, else ``~/.cache/batcher/tiktoken``), where
tiktoken finds them and checks them against its own expected SHA-256 before use. Nothing is
fetched at run time.

The encoding of a model: ``o200k_base`` for the gpt-4o family, gpt-4.1, gpt-5, o1/o3/o4 and
chatgpt-4o; ``cl100k_base`` for everything else (gpt-4, gpt-3.5, and non-OpenAI models, whose
tokenizers are unknown here: cl100k is a fair stand-in for an estimate). A job can name the
encoding itself with ``[limits] encoding``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.util
import marshal
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

ENCODINGS = ("o200k_base", "cl100k_base")
_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")
#: Tokens every message costs beyond its content, and the reply's priming (OpenAI's cookbook).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


def encoding_for_model(model: str | None) -> str:
    """The tiktoken encoding name used for ``model`` (see the module docstring)."""
    name = (model or "").rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" counts as gpt-4o
    return "o200k_base" if name.startswith(_O200K_PREFIXES) else "cl100k_base"


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding, loaded from the files shipped by ``bpe-openai`` (no network).

    batcher's own instance, not tiktoken's shared one: once the Rust tokenizer is built, the
    Python copy of the token table (``mergeable_ranks``, about 30 MB for ``o200k_base``; only
    pickling reads it) is dropped, so this encoding cannot be pickled.
    """
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; expected one of {', '.join(ENCODINGS)}")
    _place_in_cache(name)
    import tiktoken

    params = _encoding_params(name, tiktoken.__version__)
    encoding = tiktoken.Encoding(**params)
    del params
    encoding._mergeable_ranks = {}
    _loaded.add(name)
    return encoding


#: The encodings ``get_encoding`` holds loaded.
_loaded: set[str] = set()


def encoding_loaded(name: str) -> bool:
    """Whether the encoding is loaded already (counting with it does not load its table)."""
    return name in _loaded


def release_encodings() -> None:
    """Free the loaded encodings (about 45 MB resident for ``o200k_base``) and give the memory
    back to the system; the next count loads them again. For a process done counting."""
    get_encoding.cache_clear()
    _loaded.clear()
    trim_malloc()


def trim_malloc() -> None:
    """Return free heap memory to the system (glibc ``malloc_trim``; a no-op elsewhere).

    tiktoken's tables are built by the reading thread, in that thread's malloc arena, which
    glibc does not shrink by itself when they are freed.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)


def count_message_tokens(messages: Sequence[Any], encoding: str) -> int:
    """Prompt tokens of a chat request, counted as OpenAI's cookbook does.

    Text content (a string, or the ``text`` of content parts), names, and the names and
    arguments of an assistant's tool (or function) calls are encoded; every message adds
    ``TOKENS_PER_MESSAGE``, the reply ``TOKENS_PER_REPLY``. Images, audio and tool definitions
    are not counted: the figure is an estimate for limits (``requests.prompt_bound`` bounds the
    rest for ``--max-cost``).
    """
    enc = get_encoding(encoding)
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, Mapping):
            continue
        for text in _texts(message):
            total += len(enc.encode_ordinary(text))
    return total


def _texts(message: Mapping[str, Any]) -> list[str]:
    texts = []
    content = message.get("content")
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        texts.extend(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    name = message.get("name")
    if isinstance(name, str):
        texts.append(name)
    calls = message.get("tool_calls")
    functions = (
        [c.get("function") for c in calls if isinstance(c, Mapping)]
        if isinstance(calls, list)
        else []
    )
    functions.append(message.get("function_call"))  # the older form of one call
    for function in functions:
        if isinstance(function, Mapping):
            texts.extend(
                function[key] for key in ("name", "arguments") if isinstance(function.get(key), str)
            )
    return texts


def _cache_dir() -> Path:
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "batcher" / "tiktoken"
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)  # where tiktoken will look
    return folder


def _shipped_data() -> Path:
    """bpe-openai's data folder, found without importing the package (it does work on import)."""
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("bpe-openai is not installed: it ships tiktoken's encodings")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _place_in_cache(name: str) -> None:
    folder = _cache_dir()
    try:
        _write_cached(folder, name)
    except OSError:
        # An unwritable home (a locked-down container): a private folder in the temp dir.
        folder = Path(tempfile.gettempdir()) / f"batcher-tiktoken-{os.getuid()}"
        os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
        _write_cached(folder, name)


def _encoding_params(name: str, tiktoken_version: str) -> dict[str, Any]:
    """The encoding's constructor arguments, its token table included.

    tiktoken parses the table from its base64 text file (after checking its SHA-256): 0.15-0.25 s
    of CPU at every start. The parsed arguments are kept beside that file in ``marshal`` form
    (data only: reading it runs no code), which reads back in 0.05 s. The name holds tiktoken's
    version and the shipped file's size and time, so an upgrade of either makes a new one; an
    unreadable or odd file is parsed again.
    """
    from tiktoken_ext.openai_public import ENCODING_CONSTRUCTORS

    shipped = (_shipped_data() / f"{name}.tiktoken.gz").stat()
    folder = Path(os.environ["TIKTOKEN_CACHE_DIR"])  # set by _place_in_cache
    stamp = f"{tiktoken_version}-{shipped.st_size}-{int(shipped.st_mtime)}"
    path = folder / f"{name}-{stamp}.params"
    with contextlib.suppress(OSError, ValueError, EOFError, TypeError):
        kept = marshal.loads(path.read_bytes())
        if _well_formed(kept, name):
            return dict(kept)
    params: dict[str, Any] = ENCODING_CONSTRUCTORS[name]()  # reads the file, checks its SHA-256
    with contextlib.suppress(OSError, ValueError):
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_bytes(marshal.dumps(params))
        os.replace(partial, path)  # atomic: concurrent runs never see half a file
    return params


def _well_formed(params: object, name: str) -> bool:
    if not isinstance(params, dict) or params.get("name") != name:
        return False
    ranks, special = params.get("mergeable_ranks"), params.get("special_tokens")
    if not isinstance(ranks, dict) or len(ranks) < 50_000 or not isinstance(special, dict):
        return False
    token, rank = next(iter(ranks.items()))
    return (
        isinstance(token, bytes)
        and isinstance(rank, int)
        and isinstance(params.get("pat_str"), str)
    )


def _write_cached(folder: Path, name: str) -> None:
    target = folder / hashlib.sha1(_URL.format(name=name).encode()).hexdigest()
    if target.exists():
        return
    data = gzip.decompress((_shipped_data() / f"{name}.tiktoken.gz").read_bytes())
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    os.replace(partial, target)  # atomic: concurrent runs never see half a file
