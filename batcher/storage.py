"""Object storage through pyarrow's filesystems: ``s3://``, ``gs://`` and the other URIs
``pyarrow.fs.FileSystem.from_uri`` takes, and globs of several files, local or remote.

A job's ``input`` or ``output`` is a ``Location``: a local ``Path`` (a glob is a path with
``*``, ``?`` or ``[``), or the text of a URI (``location`` makes one from what a user typed).
Credentials come only from each store's own environment and configuration, as its SDK reads
them (for S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and
``~/.aws``, ``AWS_REGION``, and ``AWS_ENDPOINT_URL`` for another server such as MinIO; for
GCS: Application Default Credentials). batcher never reads, stores or shows them: a URI is
shown redacted (``shown``), and a store's error becomes one line naming it.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeAlias, cast
from urllib.parse import quote

from batcher.errors import ConfigError, InputError, OutputError
from batcher.http.redact import redact_url, scrub

if TYPE_CHECKING:
    import pyarrow.fs as pafs

#: A job's input or output: a local path (or glob), or an object-storage URI's text.
Location: TypeAlias = "Path | str"

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")
_GLOB = re.compile(r"[*?\[]")


#: Local files standing for a remote input or output during a run (``runner.staging``), and
#: the location each stands for, shown: what an output's metadata names.
_ORIGINS: dict[Path, str] = {}


def note_origin(local: Path, location: Location) -> None:
    """Remember that ``local`` stands for ``location`` (until ``forget_origin``)."""
    _ORIGINS[local] = shown(location)


def forget_origin(local: Path) -> None:
    _ORIGINS.pop(local, None)


def origin_of(location: Location) -> str:
    """What ``location`` stands for, as shown: a staged file's remote input or output (its
    credentials redacted), else ``location`` itself."""
    if isinstance(location, Path) and location in _ORIGINS:
        return _ORIGINS[location]
    return shown(location)


def origin_beside(output: Path, side: Path) -> str:
    """Where ``side``, a file beside the local ``output`` (its rejects, its errors), is for
    the user: beside the remote output ``output`` stands in for, if any (where the run
    uploads it), else ``side`` itself."""
    if output not in _ORIGINS:
        return str(side)
    base, sep, query = _ORIGINS[output].partition("?")
    return f"{base}{side.name[len(output.name) :]}{sep}{query}"


def is_uri(text: object) -> bool:
    """Whether ``text`` is an object-storage URI (``scheme://...``), not a local path."""
    return isinstance(text, str) and _URI.match(text) is not None


def location(text: str | Path) -> Location:
    """What a user typed as an input or output: a URI kept as text (a ``Path`` would fold
    its ``//``), anything else a ``Path``."""
    if isinstance(text, str) and is_uri(text):
        return text
    return Path(text)


def has_glob(location: Location) -> bool:
    """Whether ``location`` names several files by a pattern (``*``, ``?``, ``[``)."""
    return _GLOB.search(_path_part(str(location))) is not None


def shown(location: Location) -> str:
    """``location`` as messages, logs and metadata show it: a URI's credentials redacted."""
    return redact_url(location) if isinstance(location, str) else str(location)


def filesystem(uri: str, field: str = "job.input") -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for ``uri`` and the path within it (``bucket/key`` for S3).

    For S3, pyarrow's client reads the standard environment and configuration itself
    (``AWS_ENDPOINT_URL`` included); region, endpoint and credentials may also be given in the
    URI's query, as pyarrow documents (shown redacted). An unknown scheme is a ``ConfigError``
    naming ``field``."""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(_with_endpoint(uri))
    except Exception as exc:  # ArrowInvalid for a scheme pyarrow does not know, OSError...
        raise ConfigError(field, f"cannot use {shown(uri)}: {_reason(exc, uri)}") from None
    return fs, path


def _with_endpoint(uri: str) -> str:
    """An ``s3://`` URI with the endpoint the environment names (``AWS_ENDPOINT_URL_S3``, else
    ``AWS_ENDPOINT_URL``, as AWS's SDKs read them) as pyarrow's ``endpoint_override``, unless
    the URI gives one. pyarrow 26's ``from_uri`` reads ``AWS_ENDPOINT_URL`` itself, but its
    ``S3FileSystem()`` does not, nor do older versions: passing it makes every version and
    every way in agree."""
    if uri.partition("://")[0].lower() != "s3" or "endpoint_override=" in uri:
        return uri
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}endpoint_override={quote(endpoint, safe='')}"


def expand(location: Location, field: str = "job.input") -> list[Location]:
    """The files ``location`` names, in sorted order (of their full paths or URIs): itself,
    or a glob's matches (``*`` and ``?`` within one folder level). None found is an
    ``InputError`` naming ``location``."""
    if not has_glob(location):
        return [location]
    if isinstance(location, Path):
        found: list[Location] = sorted(
            (p for p in _local_matches(location) if p.is_file()), key=str
        )
    else:
        found = _remote_matches(location, field)
    if not found:
        raise InputError(f"no file matches {shown(location)}")
    return found


def files_on(location: Location, field: str = "job.input") -> tuple[pafs.FileSystem, list[str]]:
    """The files ``location`` names (``expand``) as one filesystem and its paths, in sorted
    order: what readers that take a ``filesystem=`` (pyarrow's datasets, Ray Data's
    ``read_json``/``read_parquet``/...) are given, so they reach the store as batcher does."""
    import pyarrow.fs as pafs

    files = expand(location, field)
    if isinstance(files[0], Path):
        return pafs.LocalFileSystem(), [str(Path(f).resolve()) for f in files]
    fs, _ = filesystem(str(files[0]), field)
    return fs, [filesystem(str(f), field)[1] for f in files]


def _local_matches(pattern: Path) -> list[Path]:
    anchor = Path(pattern.anchor) if pattern.is_absolute() else Path()
    relative = pattern.relative_to(anchor) if pattern.is_absolute() else pattern
    return list(anchor.glob(str(relative)))


def _remote_matches(pattern: str, field: str) -> list[Location]:
    import pyarrow.fs as pafs

    scheme, _, rest = pattern.partition("://")
    base = rest.split("?", 1)[0]
    # the folder before the first wildcard is listed, the rest matched per path level
    head = base[: _GLOB.search(base).start()]  # type: ignore[union-attr]
    folder = head.rpartition("/")[0]
    fs, root = filesystem(f"{scheme}://{folder}" + _query(pattern), field)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except Exception as exc:
        raise InputError(f"cannot list {shown(pattern)}: {_reason(exc, pattern)}") from None
    # ``root`` is the folder as the filesystem names it (no scheme): match on the same terms
    wanted = root + base[len(folder) :]
    levels = wanted.count("/")
    names = sorted(
        info.path
        for info in infos
        if info.type == pafs.FileType.File
        and info.path.count("/") == levels
        and fnmatch.fnmatchcase(info.path, wanted)
    )
    prefix = f"{scheme}://{folder}"
    return [prefix + name[len(root) :] + _query(pattern) for name in names]


def _path_part(text: str) -> str:
    """A URI without its query (where a glob's characters mean nothing), or a path."""
    return text.split("?", 1)[0] if is_uri(text) else text


def _query(uri: str) -> str:
    _, sep, query = uri.partition("?")
    return sep + query


def open_file(location: Location, field: str = "job.input") -> IO[bytes]:
    """One file opened for streamed reading (its bytes as stored: a ``.gz`` stays
    compressed). A missing file, bucket or unusable credentials: an ``InputError`` naming
    ``location`` (redacted)."""
    if isinstance(location, Path):
        try:
            return location.open("rb")
        except OSError as exc:
            raise InputError(f"cannot read {location}: {exc.strerror or exc}") from None
    fs, path = filesystem(location, field)
    try:
        stream = fs.open_input_stream(path, compression=None)
    except Exception as exc:
        raise InputError(f"cannot read {shown(location)}: {_reason(exc, location)}") from None
    # buffered: lines can be read (pyarrow's stream reads bytes only), in large pieces
    return cast(IO[bytes], io.BufferedReader(stream, buffer_size=1 << 20))


def open_seekable(location: Location, field: str = "job.input") -> IO[bytes]:
    """One file opened for reading at any offset (a Parquet file's footer first)."""
    if isinstance(location, Path):
        return open_file(location, field)
    fs, path = filesystem(location, field)
    try:
        return cast(IO[bytes], fs.open_input_file(path))
    except Exception as exc:
        raise InputError(f"cannot read {shown(location)}: {_reason(exc, location)}") from None


def exists(uri: str, field: str = "job.output") -> bool:
    """Whether the object ``uri`` names exists (its bucket's absence is an error)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, field)
    try:
        return bool(fs.get_file_info(path).type == pafs.FileType.File)
    except Exception as exc:
        raise ConfigError(field, f"cannot reach {shown(uri)}: {_reason(exc, uri)}") from None


def check_writable_place(uri: str, field: str = "job.output") -> None:
    """Refuse an output URI whose bucket (or, for other stores, folder) cannot be found or
    read with the credentials at hand: before anything is sent, not at the upload."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, field)
    scheme = uri.partition("://")[0].lower()
    place = path.split("/", 1)[0] if scheme in ("s3", "gs", "gcs") else path.rpartition("/")[0]
    try:
        kind = fs.get_file_info(place).type
    except Exception as exc:
        raise ConfigError(field, f"cannot reach {shown(uri)}: {_reason(exc, uri)}") from None
    if kind != pafs.FileType.Directory:
        what = "bucket" if scheme in ("s3", "gs", "gcs") else "folder"
        raise ConfigError(field, f"the {what} of {shown(uri)} does not exist")


def download(uri: str, dest: Path, field: str = "job.output") -> bool:
    """Copy the object ``uri`` to ``dest`` (through ``DEST.partial``, then renamed); ``False``
    when there is no such object."""
    if not exists(uri, field):
        return False
    partial = dest.with_name(dest.name + ".partial")
    try:
        with open_file(uri, field) as source, partial.open("wb") as f:
            while chunk := source.read(1 << 20):
                f.write(chunk)
        partial.replace(dest)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise InputError(f"cannot download {shown(uri)}: {_reason(exc, uri)}") from None
    return True


def upload(source: Path, uri: str, field: str = "job.output") -> None:
    """Copy the file ``source`` to the object ``uri``. An object store shows the new object
    only once it is whole (S3's single or completed multipart upload, GCS's finalised
    upload): a reader sees the old object or the new one. A failure is an ``OutputError``."""
    fs, path = filesystem(uri, field)
    try:
        with source.open("rb") as f, fs.open_output_stream(path, compression=None) as out:
            while chunk := f.read(8 << 20):
                out.write(chunk)
    except Exception as exc:
        raise OutputError(
            f"cannot upload {source} to {shown(uri)}: {_reason(exc, uri)} (the local copy is "
            "kept: run the job again to upload it)"
        ) from None


def remove(uri: str, field: str = "job.output") -> None:
    """Delete the object ``uri`` if there is one. A failure is an ``OutputError``."""
    if not exists(uri, field):
        return
    fs, path = filesystem(uri, field)
    try:
        fs.delete_file(path)
    except Exception as exc:
        raise OutputError(f"cannot delete {shown(uri)}: {_reason(exc, uri)}") from None


def reason(exc: BaseException, uri: str) -> str:
    """A store's error as a short reason, without the URI's credentials."""
    if isinstance(exc, FileNotFoundError):
        return "not found"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = text.lower()
    if "access_denied" in lowered or "accessdenied" in lowered or "forbidden" in lowered:
        return "access denied (check this store's credentials)"
    if "no_such_bucket" in lowered or "nosuchbucket" in lowered:
        return "no such bucket"
    return scrub(text, uri)


_reason = reason
