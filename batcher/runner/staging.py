"""The local side of a run whose input or output is in object storage (or whose input is a
glob): what the local engine and batch mode read and write on this machine.

- **Input**: a remote file is copied into a fresh folder under the work folder before the run
  (it is read there more than once: counted, its schema, once per variant); a glob's files,
  local or remote, are joined into one file there (``input/joined.py``: lines numbered on
  across the files in their sorted order). Standard input is copied there too, as
  ``stdin.FORM`` (``input_format``, else ``jsonl``), so it is read like a file: its columns
  and the lines' response formats read ahead, counted, read once per variant. The copy is
  removed when the run ends (a killed run's, by the next run that makes one). A single local
  file is read where it is.
- **Output**: a remote output is written in a work folder of its own,
  ``WORK/outputs/<hash of the URI>/NAME``, with its journal, status and errors files beside it
  as for a local output: a killed run resumes from that journal on this machine. When that
  folder holds no journal, the run's files already uploaded beside the URI are fetched first
  (``NAME.journal``, the output, ``NAME.errors.jsonl``, ``NAME.batches.jsonl``), so a run on
  another machine resumes where the last upload left off. At the end of the run the output is
  uploaded (the commit point: the object appears whole), then the journal (compacted by then
  when every request was recorded) and the other files.
- **Which state a run resumes from**: each upload or download writes ``NAME.synced`` in the
  work folder: the uploaded journal's size and modification time as the store reports them,
  and the local journal's size then. When the uploaded journal no longer matches it (a run on
  another machine uploaded since), the upload is taken (downloaded over the local state) if
  the local journal has not grown since; if both moved on, the run is refused (exit 2) with
  the two ways out: ``--restart``, or removing the work folder to take the upload.

``WORK`` is ``work/`` in batcher's cache folder (``disk_cache.cache_dir``), else
``batcher-work/`` in the system's temporary folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from batcher.config import JobConfig
from batcher.disk_cache import cache_dir
from batcher.errors import ConfigError, InputError
from batcher.output.formats import SUFFIXES
from batcher.storage import (
    Location,
    check_writable_place,
    download,
    expand,
    filesystem,
    forget_origin,
    has_glob,
    is_uri,
    note_origin,
    reason,
    remove,
    shown,
    upload,
)


def work_folder() -> Path:
    """Where runs keep the local side of remote inputs and outputs."""
    cache = cache_dir()
    return cache / "work" if cache is not None else Path(tempfile.gettempdir()) / "batcher-work"


def output_work_path(uri: str) -> Path:
    """The local file a remote output is written to (its folder keyed by the URI, redacted:
    no credential is written, even hashed)."""
    key = hashlib.sha256(shown(uri).encode()).hexdigest()[:20]
    name = shown(uri).split("?", 1)[0].rstrip("/").rpartition("/")[2] or "output"
    return work_folder() / "outputs" / key / name


def _run_files(output: Path) -> list[Path]:
    """The files beside an output that a run on another machine resumes from, in the order
    they are uploaded: the output first (the commit point), the journal after it."""
    from batcher.batch.state import state_path
    from batcher.output.formats import errors_path, rejects_path
    from batcher.output.journal import journal_path

    return [output, errors_path(output), rejects_path(output), journal_path(output),
            state_path(output)]  # fmt: skip


def _side_files(output: Path) -> list[Path]:
    """The files beside an output that a run removes when it has nothing to put in them (no
    line rejected, no request failed): their remote copies go with them."""
    from batcher.output.formats import errors_path, rejects_path

    return [errors_path(output), rejects_path(output)]


@dataclass
class Staging:
    """A job made local (``job``), and what is owed to object storage at its end."""

    job: JobConfig
    remote_output: str | None = None
    temporary: list[Path] = field(default_factory=list)
    #: local files standing for remote ones (``storage.note_origin``), forgotten at close
    standing_in: list[Path] = field(default_factory=list)

    def upload(self, say: Callable[[str], object]) -> None:
        """Upload the run's files to beside the remote output (if any), the output first."""
        if self.remote_output is None or not isinstance(self.job.output, Path):
            return
        base = self.remote_output
        query = ""
        if "?" in base:
            base, _, query = base.partition("?")
            query = "?" + query
        local = self.job.output
        for path in _run_files(local):
            uri = base + path.name[len(local.name) :] + query
            if path.exists():
                upload(path, uri)
            elif path in _side_files(local):
                remove(uri)  # an earlier run's, that this run no longer has: stale
        _note_synced(local, self.remote_output)
        if local.exists():
            say(f"uploaded to {shown(self.remote_output)}")

    def stand_in(self, local: Location | None, location: Location) -> None:
        """Name ``location`` (as shown) wherever ``local`` would be named: the metadata."""
        if isinstance(local, Path) and local != location:
            note_origin(local, location)
            self.standing_in.append(local)

    def close(self) -> None:
        """Remove the input's local copy."""
        for local in self.standing_in:
            forget_origin(local)
        for folder in self.temporary:
            shutil.rmtree(folder, ignore_errors=True)


def stage(job: JobConfig, *, restart: bool = False) -> Staging:
    """``job`` with a local input and output (the same job when both are local files)."""
    staging = Staging(job)
    if isinstance(job.output, str) and job.output == job.input:
        raise ConfigError(
            "job.output", f"{shown(job.output)} is the input: it would be overwritten"
        )
    try:
        if isinstance(job.output, str):  # first: a missing bucket costs no input download
            check_output_suffix(job.output)
            staging.remote_output = job.output
            staging.job = dataclasses.replace(
                staging.job, output=_local_output(job.output, restart=restart)
            )
            staging.stand_in(staging.job.output, job.output)
        if job.input_format is not None and str(job.input) != "-":
            raise ConfigError(
                "job.input_format",
                "only for standard input (-i -): a file's form comes from its suffix",
            )
        if str(job.input) == "-":
            local = _spooled_stdin(job.input_format or "jsonl", staging.temporary)
            staging.job = dataclasses.replace(staging.job, input=local)
            staging.stand_in(local, Path("-"))
        elif job.input is not None and (is_uri(job.input) or _is_local_glob(job.input)):
            staging.job = dataclasses.replace(
                staging.job, input=_local_input(job.input, staging.temporary)
            )
            staging.stand_in(staging.job.input, job.input)
    except BaseException:
        staging.close()
        raise
    return staging


def _is_local_glob(location: Location) -> bool:
    """A local pattern, not a file whose name holds ``[`` or ``*`` (such a file is read)."""
    return has_glob(location) and not Path(location).exists()


def _local_input(location: Location, temporary: list[Path]) -> Path:
    """A remote file copied, or a glob's files joined, into a fresh folder; its path."""
    from batcher.input.joined import join

    files = expand(location)
    if len(files) == 1 and isinstance(files[0], Path):
        return files[0]  # a glob matching one local file: read in place
    folder = _fresh_folder("inputs")
    temporary.append(folder)
    if len(files) == 1:
        uri = str(files[0])
        name = uri.split("?", 1)[0].rstrip("/").rpartition("/")[2] or "input"
        dest = folder / name
        if not download(uri, dest, "job.input"):
            raise InputError(f"input not found: {shown(uri)}")
        return dest
    return join(files, folder)


def _spooled_stdin(form: str, temporary: list[Path]) -> Path:
    """Standard input copied into a fresh folder, named ``stdin.FORM``; its path."""
    folder = _fresh_folder("inputs")
    temporary.append(folder)
    local = folder / f"stdin.{form}"
    try:
        with local.open("wb") as spool:
            shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
    except OSError as exc:
        raise InputError(f"cannot copy standard input to {local}: {exc.strerror or exc}") from None
    return local


def _fresh_folder(kind: str) -> Path:
    """A new folder in ``WORK/kind``, named after this process: a killed run cannot remove
    its copy, so the folders of processes that are gone are removed first."""
    root = work_folder() / kind
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_orphans(root)
        return Path(tempfile.mkdtemp(dir=root, prefix=f"{os.getpid()}-"))
    except OSError as exc:
        raise ConfigError("job", f"cannot make a work folder in {root}: {exc.strerror}") from None


def _remove_orphans(root: Path) -> None:
    """Remove the folders in ``root`` whose process (the number their name starts with) is
    no longer running."""
    for folder in root.iterdir():
        pid = folder.name.partition("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


def _local_output(uri: str, *, restart: bool) -> Path:
    """The work-folder file a remote output is written to, with the state of an earlier
    upload fetched when this machine has none or the upload is newer (``_upload_is_newer``)."""
    from batcher.output.journal import journal_path

    check_writable_place(uri)
    check_not_a_prefix(uri)
    local = output_work_path(uri)
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("job.output", f"cannot make {local.parent}: {exc.strerror}") from None
    if restart:
        return local  # this machine's state is the run's
    if journal_path(local).exists():
        if not _upload_is_newer(local, uri):
            return local
        for path in _run_files(local):  # the upload is the run's state: none of this one's
            path.unlink(missing_ok=True)
    fetch_run_files(uri, local)
    _note_synced(local, uri)
    return local


def fetch_run_files(uri: str, local: Path) -> bool:
    """Download the run's files uploaded beside ``uri`` over ``local``'s (the output only
    when there is a journal); whether a journal or an output was found."""
    from batcher.output.journal import journal_path

    base, sep, query = uri.partition("?")
    for path in _run_files(local):
        if path != local:
            download(base + path.name[len(local.name) :] + sep + query, path)
    if journal_path(local).exists():
        download(uri, local)
        return True
    return download(uri, local)


def fetched_output(uri: str) -> Path:
    """The local file standing for the remote output ``uri`` for ``batcher status`` and
    ``report``: this machine's work folder when it holds the run's journal, else the run's
    files uploaded beside ``uri``, downloaded to a fresh folder (``WORK/fetched``, removed by
    a later ``status`` or ``report`` once this process is gone). Neither: an ``InputError``
    saying so in one line."""
    from batcher.output.journal import journal_path

    local = output_work_path(uri)
    if journal_path(local).exists() or local.exists():
        note_origin(local, uri)
        return local
    fetched = _fresh_folder("fetched") / local.name
    if not fetch_run_files(uri, fetched):
        raise InputError(
            f"no run of {shown(uri)}: none on this machine, and no output or journal there"
        )
    note_origin(fetched, uri)
    return fetched


def check_output_suffix(uri: str) -> None:
    """Refuse a remote output that is neither ``.jsonl`` nor ``.parquet``, naming the URI."""
    name = uri.split("?", 1)[0].rstrip("/")
    if not name.lower().endswith(SUFFIXES):
        raise ConfigError(
            "job.output",
            f"{shown(uri)!r} must end in .jsonl (OpenAI Batch API lines) or .parquet",
        )


def check_not_a_prefix(uri: str) -> None:
    """Refuse an output URI under which objects exist (``NAME/part-*``: the Ray engine's
    output), as a local output that is a folder is refused."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, "job.output")
    try:
        kind = fs.get_file_info(path.rstrip("/")).type
    except Exception:  # unreachable stores are reported by check_writable_place
        return
    if kind == pafs.FileType.Directory:
        raise ConfigError(
            "job.output",
            f"{shown(uri)} is a folder (the Ray engine's output?): choose another output, "
            "or run the job with --engine ray",
        )


def _synced_path(local: Path) -> Path:
    return local.with_name(local.name + ".synced")


def _remote_journal(uri: str) -> list[int] | None:
    """The uploaded journal's size and modification time (ns), or ``None`` when absent."""
    import pyarrow.fs as pafs

    base, sep, query = uri.partition("?")
    journal = base + ".journal" + sep + query
    fs, path = filesystem(journal, "job.output")
    try:
        info = fs.get_file_info(path)
    except Exception as exc:
        raise ConfigError("job.output", f"cannot reach {shown(uri)}: {reason(exc, uri)}") from None
    if info.type != pafs.FileType.File:
        return None
    return [int(info.size or 0), int(info.mtime_ns or 0)]


def _local_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _note_synced(local: Path, uri: str) -> None:
    """Record what the local state and the upload were when they last matched."""
    from batcher.output.journal import journal_path

    try:
        remote = _remote_journal(uri)
    except ConfigError:  # the note is a guard only: a store that cannot answer leaves none
        return
    note = {"remote": remote, "local": _local_size(journal_path(local))}
    _synced_path(local).write_text(json.dumps(note))


def _upload_is_newer(local: Path, uri: str) -> bool:
    """Whether another machine uploaded since this one last uploaded or downloaded; a
    ``ConfigError`` when the local journal has moved on too (neither state holds the other)."""
    from batcher.output.journal import journal_path

    remote = _remote_journal(uri)
    try:
        note = json.loads(_synced_path(local).read_text())
    except (OSError, ValueError):
        note = None
    if remote is None or (note is not None and note.get("remote") == remote):
        return False
    if note is not None and note.get("local") == _local_size(journal_path(local)):
        return True
    raise ConfigError(
        "job.output",
        f"{shown(uri)} was uploaded by another run since this machine's run of it "
        f"({local.parent}) last met it: run with --restart to start over, or remove that "
        "folder to resume from the upload",
    )
