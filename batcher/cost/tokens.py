"""Token counts with tiktoken, with its encodings loaded offline.

tiktoken downloads an encoding's BPE file on first use. batcher runs where there may be no
network, so it builds its encodings from the files the ``bpe-openai`` package ships, checked
against their known SHA-256, with tiktoken's public ``Encoding`` constructor. Nothing is
fetched at run time, and nothing of tiktoken's (its registry, its cache folder, the
environment) is read or changed.

The encoding of a model: ``o200k_base`` for the gpt-4o family, gpt-4.1, gpt-5, o1/o3/o4 and
chatgpt-4o; ``cl100k_base`` for everything else (gpt-4, gpt-3.5, and non-OpenAI models, whose
tokenizers are unknown here: cl100k is a fair stand-in for an estimate). A job can name the
encoding itself with ``[limits] encoding``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import importlib.util
import marshal
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batcher.disk_cache import cache_dir

if TYPE_CHECKING:
    import tiktoken

ENCODINGS = ("o200k_base", "cl100k_base")
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
    """A tiktoken encoding, built from the files shipped by ``bpe-openai`` (no network).

    batcher's own instance, not tiktoken's shared one: built with tiktoken's public
    constructor from the shipped table, so nothing of tiktoken's (its registry, its cache
    folder, the environment) is read or changed.
    """
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; expected one of {', '.join(ENCODINGS)}")
    import tiktoken

    params = _encoding_params(name, tiktoken.__version__)
    encoding = tiktoken.Encoding(**params)
    _loaded[name] = encoding
    return encoding


#: The encodings ``get_encoding`` holds loaded, by name.
_loaded: dict[str, tiktoken.Encoding] = {}


def encoding_loaded(name: str) -> bool:
    """Whether the encoding is loaded already (counting with it does not load its table)."""
    return name in _loaded


def loaded_encodings() -> list[tiktoken.Encoding]:
    """The encodings batcher holds loaded (those ``get_encoding`` returned since the last
    ``release_encodings``)."""
    return list(_loaded.values())


def release_encodings() -> None:
    """Drop batcher's references to the loaded encodings (about 45 MB resident for
    ``o200k_base``, once nothing else holds them); the next count loads them again."""
    get_encoding.cache_clear()
    _loaded.clear()


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


#: What builds each encoding besides its token table: the SHA-256 of its BPE file, its split
#: pattern and its special tokens (tiktoken's ``tiktoken_ext.openai_public``; a test checks
#: that counts agree with tiktoken's own encodings).
_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
_PATTERNS = {
    "o200k_base": "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
    "cl100k_base": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
        r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
}
_SPECIAL_TOKENS = {
    "o200k_base": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    "cl100k_base": {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
}


def _shipped_data() -> Path:
    """bpe-openai's data folder, found without importing the package (it does work on import)."""
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("bpe-openai is not installed: it ships tiktoken's encodings")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _encoding_params(name: str, tiktoken_version: str) -> dict[str, Any]:
    """The encoding's constructor arguments, its token table included.

    The table is parsed from the shipped base64 text file (after checking its SHA-256):
    0.15-0.25 s of CPU at every start. The parsed arguments are kept in batcher's cache
    folder (``disk_cache``, under ``tiktoken/``) in ``marshal`` form (data only: reading it
    runs no code), which reads back in 0.05 s. The name holds tiktoken's version and the
    shipped file's size and time, so an upgrade of either makes a new one; an unreadable or
    odd file is parsed again, an unwritable folder is not used.
    """
    shipped = _shipped_data() / f"{name}.tiktoken.gz"
    info = shipped.stat()
    stamp = f"{tiktoken_version}-{info.st_size}-{int(info.st_mtime)}"
    folder = cache_dir()
    path = None if folder is None else folder / "tiktoken" / f"{name}-{stamp}.params"
    if path is not None:
        with contextlib.suppress(OSError, ValueError, EOFError, TypeError):
            kept = marshal.loads(path.read_bytes())
            if _well_formed(kept, name):
                return dict(kept)
    params = {
        "name": name,
        "pat_str": _PATTERNS[name],
        "mergeable_ranks": _parse_bpe(gzip.decompress(shipped.read_bytes()), name),
        "special_tokens": dict(_SPECIAL_TOKENS[name]),
    }
    if path is not None:
        with contextlib.suppress(OSError, ValueError):
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            partial.write_bytes(marshal.dumps(params))
            os.replace(partial, path)  # atomic: concurrent runs never see half a file
    return params


def _parse_bpe(data: bytes, name: str) -> dict[bytes, int]:
    """A BPE file's token table (lines of base64 token and rank), once its SHA-256 matches."""
    if hashlib.sha256(data).hexdigest() != _SHA256[name]:
        raise RuntimeError(f"the {name} file shipped by bpe-openai is not the expected one")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


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
