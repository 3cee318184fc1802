"""Several input files (a glob's matches, local or in object storage) joined into one local
file of their form, so the run reads one input whose lines are numbered continuously.

The files are taken in sorted order of their paths or URIs. JSONL: their lines one after
another (a file's missing last newline added, a later file's BOM dropped). CSV/TSV: the first
file's header, then every file's data rows; each later file must start with the same header
line. Parquet: every file's rows in one file; each must have the first file's schema.
A ``.gz`` file is decompressed as it is read (the joined file is not compressed).
"""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, cast

from batcher.errors import InputError
from batcher.input.table_files import Form, input_form
from batcher.storage import Location, open_file, open_seekable, shown

_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20


def form_of(files: Sequence[Location]) -> Form:
    """The one form (by suffix) of ``files``; files of several forms are refused."""
    forms = {input_form(Path(_name(f))) for f in files}
    if len(forms) > 1:
        raise InputError(
            f"the input's files are not all of one form ({', '.join(sorted(forms))}): "
            f"{shown(files[0])} ..."
        )
    return forms.pop()


def join(files: Sequence[Location], dest_folder: Path) -> Path:
    """``files`` joined into one file in ``dest_folder`` (``input.<form>``); its path."""
    form = form_of(files)
    dest = dest_folder / f"input.{form}"
    if form == "parquet":
        _join_parquet(files, dest)
        return dest
    with dest.open("wb") as out:
        header: bytes | None = None
        for number, location in enumerate(files):
            with _opened(location) as source:
                first = source.readline().removeprefix(_BOM)
                if form in ("csv", "tsv"):
                    if number == 0:
                        header = first
                    elif first.rstrip(b"\r\n") != (header or b"").rstrip(b"\r\n"):
                        raise InputError(
                            f"{shown(location)} starts with another header than "
                            f"{shown(files[0])}: the files of one input share their columns"
                        )
                    else:
                        first = b""
                last = _copy(first, source, out)
                if last not in (b"", b"\n"):
                    out.write(b"\n")  # a file's last line ends before the next file's first
    return dest


def _copy(first: bytes, source: IO[bytes], out: IO[bytes]) -> bytes:
    """``first`` then the rest of ``source`` into ``out``; the last byte written (or b"")."""
    last = first[-1:]
    out.write(first)
    while chunk := source.read(_CHUNK):
        out.write(chunk)
        last = chunk[-1:]
    return last


def _join_parquet(files: Sequence[Location], dest: Path) -> None:
    import pyarrow.parquet as pq

    writer: pq.ParquetWriter | None = None
    try:
        for location in files:
            with open_seekable(location) as source:
                try:
                    parquet = pq.ParquetFile(source)
                except Exception as exc:
                    raise InputError(f"cannot read {shown(location)} as Parquet: {exc}") from None
                schema = parquet.schema_arrow
                if writer is None:
                    writer = pq.ParquetWriter(dest, schema)
                elif not schema.equals(writer.schema, check_metadata=False):
                    raise InputError(
                        f"{shown(location)} has other columns than {shown(files[0])}: the "
                        "files of one input share their schema"
                    )
                for batch in parquet.iter_batches(batch_size=65536):
                    writer.write_batch(batch)
    finally:
        if writer is not None:
            writer.close()


@contextlib.contextmanager
def _opened(location: Location) -> Iterator[IO[bytes]]:
    """A file opened for reading, decompressed when its name ends in ``.gz``."""
    with open_file(location) as source:
        if _name(location).lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=source, mode="rb") as unzipped:
                yield cast(IO[bytes], unzipped)
        else:
            yield source


def _name(location: Location) -> str:
    """The file name of a path or URI (a URI's query left out)."""
    return str(location).split("?", 1)[0].rstrip("/").rpartition("/")[2]
