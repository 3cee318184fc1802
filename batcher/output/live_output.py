"""A run's output made from its journal: as the run goes (``LiveOutput``), for a run whose
journal starts empty (``live_output_for``), else at the end (``write_output``).

Such a run's output is exactly its journal's final records (``Journal.results``: a provisional
record, made before a re-ask, is replaced by the final one), in input order (line, then the
job's variants in their order: ``ordering.InputOrder``). ``LiveOutput`` journals each record and
turns each final one into its row at once (Arrow's column values for Parquet, the line's text
for JSONL), then holds it while an earlier line may still come: the engine's watermark
(``engine.watermark``) says which lines are settled, and the rows below it are written in
order, in row groups, as the run goes. Answers come nearly in input order, so about as many
rows as there are requests in flight are held. The compact journal that replaces the journal
at the end of a complete run (``compaction``) is written as the rows are, a record per row, and
put in place at the end: the end of the run only writes the last rows and closes the files,
where writing from the journal reads every record back and converts it (about 30 µs a record,
after the last answer), and compacting reads the journal once more.

Held rows have a bound (``LIVE_OUTPUT_MAX_HELD_BYTES``): one request stuck in long retries
holds back every row after it. Past the bound, or when a record comes for a line whose place
in the output was already written (a result held back and released late: ``setup_check``),
the live output gives up, and the output is written from the journal at the end (an index of
16 bytes a record, no answer held); a run that stops early, or has no watermark to follow, holds
its rows and writes them at the end. The writer's import and the input's hash (the provenance)
are done in a thread, started by the first final record, never on the event loop: final
records that come before they are done wait, in order, in the journal (their offsets held).

A run that resumes a journal writes its output from the journal at the end
(``write_output``), since earlier runs' records are merged in. So does a run whose live
output failed (a full disk, say): the journal holds everything either way.
"""

from __future__ import annotations

import heapq
import threading
from array import array
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batcher.output.compaction import CompactJournal, compact_record
from batcher.output.journal import Journal, decode, kept_in
from batcher.output.ordering import InputOrder, records_in_order
from batcher.records import Result, record_key

if TYPE_CHECKING:
    from batcher.output.shape import OutputShape
    from batcher.output.split import OutputFiles
    from batcher.runner.stats import RunStats

#: The largest input whose output is written in small row groups (``SMALL_ROW_GROUP_SIZE``;
#: see ``small_input``): about 35,000 short requests.
LIVE_OUTPUT_MAX_BYTES = 8 * 2**20
#: The most rows a Parquet input (counted from its footer) may have for its output to be
#: written in small row groups: a Parquet file of short rows holds far more rows in 8 MiB than
#: JSONL requests do (a million one-column rows take ~5 MB).
LIVE_OUTPUT_MAX_ROWS = 50_000
#: About the most bytes of rows an output written as the run goes holds back (``held_weight``)
#: before it gives up: one request stuck in retries holds back every row after it,
#: and the input's size does not bound their answers (12,000 rows of 2,000-token answers come
#: from a 73 KB CSV). Past it the rows are dropped and the output is written from the journal at
#: the end: memory stays bounded, and only such a run's end is slower.
LIVE_OUTPUT_MAX_HELD_BYTES = 64 * 2**20


def held_weight(line_bytes: int) -> int:
    """About the memory a held row takes, from its journal line's length: its text (answer,
    prompt, input) as Python strings and values, about twice the line's bytes, plus the
    objects' overhead."""
    return 2 * line_bytes + 1024


#: Parquet row groups of a small input's output (at most ``LIVE_OUTPUT_MAX_BYTES``), instead
#: of the writer's 5,000: the last row group is written after the last answer, so a smaller one
#: ends the run sooner (5,000 rows took ~20 ms, 1,000 ~5 ms), for a file ~5 % larger. A large
#: output keeps the writer's: each row group's footer metadata (~30 KB) is held until close.
SMALL_ROW_GROUP_SIZE = 1_000


def _nothing_settled() -> int:
    return 0


class LiveOutput:
    """The engine's result sink: the journal first, then the output writer (final records),
    in input order (see the module)."""

    def __init__(
        self,
        journal: Journal,
        output: Path,
        metadata: Callable[[], dict[str, str]],
        *,
        row_group_size: int | None = None,
        shape: Callable[[], OutputShape] | None = None,
        variants: Sequence[str] = (),
        split_errors: bool = False,
        max_held: int | None = None,
    ) -> None:
        """``metadata`` makes the output's provenance (it hashes the input: called once, in
        a thread). ``row_group_size``: Parquet's, when not the writer's default. ``shape``
        makes the output's typed columns (``OutputShape``; called once, in the same thread;
        ``None``: the plain shape). ``variants`` (the job's, in order) set the rows' order;
        ``split_errors``: failures apart; ``max_held``: about the bytes of rows held back
        before giving up (the output is then written from the journal at the end; ``None``:
        ``LIVE_OUTPUT_MAX_HELD_BYTES``). Rows are
        held until ``close`` unless ``follow`` gives the engine's watermark."""
        self._journal = journal
        self._max_held = LIVE_OUTPUT_MAX_HELD_BYTES if max_held is None else max_held
        self._make_shape = shape
        self._shape: OutputShape | None = None
        self._order = InputOrder(variants)
        self._split_errors = split_errors
        self._row_group_size = row_group_size
        self._output = output
        self._make_metadata = metadata
        self._metadata: dict[str, str] | None = None
        self._preparing = threading.Lock()
        self._prepare_started = False
        self._prepare_failed = False
        # Where in the journal the final records that came before the writer was ready are:
        # read back and taken when it opens. Only their offsets are held (8 bytes each, not a
        # Result of a few kB): a large input's hash keeps thousands of records waiting.
        self._waiting = array("q")
        self._waiting_bytes = array("q")  # their lines' lengths
        self._writer: OutputFiles | None = None
        self._compact: CompactJournal | None = None
        self._low: Callable[[], int] = _nothing_settled
        # Rows held back, a heap of (order key, arrival, (in errors file, row), compact record).
        # (order key, arrival, (in errors file, row), compact record, weight)
        self._held: list[tuple[int, int, tuple[bool, Any], dict[str, Any], int]] = []
        self._held_bytes = 0  # the held rows' weights (``held_weight``)
        self._arrived = 0
        self._written = -1  # the order key of the last row written
        # Keys whose provisional record (an answer about to be re-asked) has no final record
        # yet: if the run ends with some (the re-ask was cancelled, or its record could not be
        # journaled), the journal's answer for them is the provisional one, which this output
        # does not hold, so it is written from the journal instead.
        self._unfinished: set[str] = set()
        self.failed = False
        self.ok = 0
        self.error = 0

    def follow(self, low: Callable[[], int]) -> None:
        """Write the rows of input lines below ``low()`` as the run goes: the first line whose
        records may still come (``engine.watermark.Watermark.low``)."""
        self._low = low

    @property
    def held_rows(self) -> int:
        """Rows converted and held back, to be written in order."""
        return len(self._held)

    def append(self, result: Result, body_hash: str, *, provisional: bool = False) -> None:
        """Journal the record (an ``OSError`` there stops the run); then take a final one."""
        offset = self._journal.size
        try:
            self._journal.append(result, body_hash, provisional=provisional)
        except OSError:
            # The line may be on disk all the same (a failed fsync after the write): only the
            # journal knows what it holds now, so the output is written from it.
            self._give_up()
            raise
        key = record_key(result.custom_id, result.variant)
        if provisional:
            self._unfinished.add(key)
            return
        self._unfinished.discard(key)
        if self.failed:
            return
        if self._writer is None and self._metadata is None and not self._prepare_failed:
            # The writer's import and the input's hash are not done: never on the event loop;
            # the record waits for them, in the journal.
            self._waiting.append(offset)
            self._waiting_bytes.append(self._journal.size - offset)
            self._prepare_in_thread()
            return
        self._take([(result, body_hash, self._journal.size - offset)])

    def _read_waiting(self) -> list[tuple[Result, str, int]]:
        """The records that waited for the writer, read back from the journal (and forgotten),
        each with its line's length."""
        offsets, self._waiting = self._waiting, array("q")
        sizes, self._waiting_bytes = self._waiting_bytes, array("q")
        records = self._journal.read_at(offsets)
        return [(decode(r), r["hash"], size) for r, size in zip(records, sizes, strict=True)]

    def _take(self, records: list[tuple[Result, str, int]]) -> None:
        """Convert records into rows and hold them (those waiting first), opening the writer
        with the first; then write the rows the watermark lets go."""
        try:
            if self._writer is None:
                self._writer = self._open()
            if self._waiting:
                records = [*self._read_waiting(), *records]
            order, held, writer = self._order, self._held, self._writer
            for result, body_hash, line_bytes in records:
                key = order.of(result)
                if key < self._written:  # its place is written already: held back, late
                    self._give_up()
                    return
                record = compact_record(result, body_hash)
                weight = held_weight(line_bytes)
                heapq.heappush(held, (key, self._arrived, writer.row(result), record, weight))
                self._arrived += 1
                self._held_bytes += weight
                if result.status == "ok":
                    self.ok += 1
                else:
                    self.error += 1
            self._write_below(order.first(self._low()))
        except Exception:  # a full disk, or a value pyarrow refuses: not worth the run
            self._give_up()
            return
        if self._held_bytes > self._max_held:
            self._give_up()  # too many answers held back: written from the journal at the end

    def _write_below(self, bound: int) -> None:
        """Write the held rows whose order key is below ``bound``, in order."""
        held = self._held
        if not held or held[0][0] >= bound:
            return
        assert self._writer is not None and self._compact is not None
        write, add = self._writer.write_row, self._compact.add_compact
        key = self._written
        while held and held[0][0] < bound:
            key, _, row, record, weight = heapq.heappop(held)
            write(row)
            add(record, in_errors=row[0])
            self._held_bytes -= weight
        self._written = key

    def close(
        self,
        ending: Callable[[int, int], Mapping[str, str]] | None = None,
        *,
        compact: bool = False,
    ) -> bool:
        """Finish the output (atomically, as ``write_output`` does); false if it could not be
        written as the run went, and must be written from the journal. ``ending`` gives the
        metadata known only at the end from the output's ok and error counts; ``compact``
        (the run recorded every request): put the compact journal in the journal's place
        (``compaction``), else drop it."""
        if self._unfinished:
            self._give_up()
        if self.failed:
            return False
        self._take([])  # opens the writer (the records waiting taken), writes what is held
        if not self.failed:
            try:
                self._write_below(1 << 126)  # above every key: the rest, in order
            except Exception:
                self._give_up()
        if self.failed:
            return False
        assert self._writer is not None and self._compact is not None
        if ending is not None:
            self._writer.add_metadata(ending(self.ok, self.error))
        self._writer.close()  # raises OutputError if the file cannot be finished
        if compact:
            self._compact.commit()  # the output first: the compact records point into it
        else:
            self._compact.abort()
        return True

    def _prepare_quietly(self) -> None:
        """Import the writer (pyarrow: ~50 ms) and make the provenance (in a thread, started
        by the first final record). Never raises: a failure is raised again when the writer
        opens."""
        try:
            self._prepare()
        except Exception:
            self._prepare_failed = True

    def _prepare(self) -> None:
        with self._preparing:
            if self._metadata is None:
                import batcher.output.writers  # noqa: F401

                if self._make_shape is not None:
                    self._shape = self._make_shape()
                self._metadata = self._make_metadata()

    def _prepare_in_thread(self) -> None:
        if not self._prepare_started:
            self._prepare_started = True
            threading.Thread(target=self._prepare_quietly, daemon=True).start()

    def _open(self) -> OutputFiles:
        """The writer, opened with the first record (the ``.partial`` file until ``close``),
        and the compact journal beside the journal (``JOURNAL.partial``)."""
        from batcher.output.rows import PLAIN
        from batcher.output.split import open_outputs
        from batcher.output.writers import DEFAULT_ROW_GROUP_SIZE

        self._prepare()
        writer = open_outputs(
            self._output,
            metadata=self._metadata,
            row_group_size=self._row_group_size or DEFAULT_ROW_GROUP_SIZE,
            split_errors=self._split_errors,
            shape=self._shape or PLAIN,
        )
        try:
            self._compact = CompactJournal(self._journal)
        except BaseException:
            writer.abort()
            raise
        return writer

    def abort(self) -> None:
        """Drop the unfinished output and compact journal (the run failed); whatever was
        there before stays."""
        if self._writer is not None:
            self._writer.abort()
        if self._compact is not None:
            self._compact.abort()

    def _give_up(self) -> None:
        """Stop writing as the run goes; the output is written from the journal at the end."""
        self.abort()
        self.failed = True
        self._writer, self._compact, self._waiting, self._held = None, None, array("q"), []
        self._waiting_bytes, self._held_bytes = array("q"), 0


def live_output_for(
    journal: Journal,
    output: Path,
    input_path: Path,
    metadata: Callable[[], dict[str, str]],
    shape: Callable[[], OutputShape] | None = None,
    *,
    variants: Sequence[str] = (),
    split_errors: bool = False,
) -> LiveOutput | None:
    """The output written as the run goes, for a fresh journal (in small row groups for a
    small input file: ``small_input``); ``None``: a resumed journal, whose output is written
    from the journal at the end (``write_output``)."""
    if journal.entries:
        return None
    return LiveOutput(
        journal, output, metadata,
        row_group_size=SMALL_ROW_GROUP_SIZE if small_input(input_path) else None,
        shape=shape, variants=variants, split_errors=split_errors,
    )  # fmt: skip


def small_input(path: Path) -> bool:
    """Whether an output is written in small row groups (``SMALL_ROW_GROUP_SIZE``): an input
    file of at most ``LIVE_OUTPUT_MAX_BYTES`` and, for Parquet, of at most
    ``LIVE_OUTPUT_MAX_ROWS`` rows (read from its footer); stdin's size is unknown: no.

    Each row group's footer metadata is held until the file closes (about 30 KB): small row
    groups over a million rows would hold 30 MB of it.
    """
    if str(path) == "-":
        return False
    try:
        if path.stat().st_size > LIVE_OUTPUT_MAX_BYTES:
            return False
    except OSError:
        return False
    from batcher.input.columns import count_rows
    from batcher.input.table_files import input_form

    if input_form(path) != "parquet":
        return True
    rows = count_rows(path)
    return rows is not None and rows <= LIVE_OUTPUT_MAX_ROWS


def finish_output(
    journal: Journal,
    live: LiveOutput | None,
    output: Path,
    stats: RunStats,
    metadata: Callable[[], dict[str, str]],
    shape: Callable[[], OutputShape] | None = None,
    *,
    variants: Sequence[str] = (),
    split_errors: bool = False,
    ending: Callable[[RunStats], Mapping[str, str]] | None = None,
) -> None:
    """Finish a run's output: the live one, else (none, or it failed) from the journal; and
    compact the journal when the run recorded every request (``compaction``). ``shape``
    makes the output's typed columns (``None``: the plain shape); ``ending`` gives the
    metadata known only at the end (how the run ended) from the stats, once they hold the
    output's counts."""
    complete = not stats.stopped_early and stats.config_error is None

    def counted(ok: int, error: int) -> Mapping[str, str]:
        stats.output_ok, stats.output_error = ok, error
        return {} if ending is None else ending(stats)

    if live is not None and live.close(counted, compact=complete):
        return
    write_output(
        journal, output, stats, metadata(), None if shape is None else shape(),
        variants=variants, split_errors=split_errors, compact=complete, ending=ending,
    )  # fmt: skip


def write_output(
    journal: Journal,
    output: Path,
    stats: RunStats,
    metadata: dict[str, str] | None = None,
    shape: OutputShape | None = None,
    *,
    variants: Sequence[str] = (),
    split_errors: bool = False,
    compact: bool = False,
    ending: Callable[[RunStats], Mapping[str, str]] | None = None,
) -> None:
    """Write the output from the journal's latest records, atomically (``.partial`` + rename),
    with ``shape``'s typed columns (``None``: the plain shape), in input order (line, then
    ``variants`` in their order: ``ordering.records_in_order``); failures to
    ``OUTPUT.errors.jsonl`` when ``split_errors``; ``ending``: metadata made from the stats
    once they hold the output's counts. Answers of compact records are read back from the
    output being replaced. Then, when ``compact`` or when the journal holds compact records
    already (their rows must point into the new output), the journal is compacted."""
    # pyarrow: imported once the requests are done
    from batcher.output.compaction import CompactJournal, PreviousOutput
    from batcher.output.provenance import with_earlier_429s
    from batcher.output.rows import PLAIN
    from batcher.output.split import open_outputs

    ok = error = 0
    order = InputOrder(variants)
    previous = PreviousOutput(output)
    compacting = CompactJournal(journal) if compact or journal.kept_elsewhere() else None
    try:
        with open_outputs(
            output, metadata=metadata, split_errors=split_errors, shape=shape or PLAIN
        ) as writer:
            for record in records_in_order(journal, order):
                result = decode(record) if kept_in(record) is None else previous.result(record)
                writer.write(result)
                if compacting is not None:
                    compacting.add(record, in_errors=split_errors and result.status != "ok")
                if result.status == "ok":
                    ok += 1
                else:
                    error += 1
            stats.output_ok, stats.output_error = ok, error
            if ending is not None:
                ended = ending(stats)
                if journal.entries:  # earlier runs' answers are in it: their 429s too
                    ended = with_earlier_429s(ended, output)
                writer.add_metadata(ended)
    except BaseException:
        if compacting is not None:
            compacting.abort()
        raise
    finally:
        previous.close()
    if compacting is not None:
        compacting.commit()
