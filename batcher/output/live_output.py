"""A run's output made from its journal: as the run goes (``LiveOutput``), for a run whose
journal starts empty and whose input is a small file (``live_output_for``), else at the end
(``write_output``).

Such a run's output is exactly its journal's final records (``Journal.results``: a provisional
record, made before a re-ask, is replaced by the final one), in input order (line, then the
job's variants in their order: ``ordering.InputOrder``). So ``LiveOutput`` journals each record
and hands the final ones to the output writer at once, which converts each into its row (Arrow
columns for Parquet, the line's text for JSONL) and holds it: at close the rows are sorted into
input order and written. What it holds is the output's rows, uncompressed, for an input of at
most ``LIVE_OUTPUT_MAX_BYTES`` (and ``LIVE_OUTPUT_MAX_ROWS`` rows for Parquet), and never more
than ``LIVE_OUTPUT_MAX_HELD_BYTES`` of them: past that it gives up, and the output is written
from the journal at the end, as for a large input (an index of 16 bytes a record, no answer
held). The end of the run only sorts, compresses and writes them,
instead of reading the whole journal back and converting it then (about 30 µs a record, after
the last answer). The rows are built while requests are out, when the process mostly waits.
The writer's import and the input's hash (the provenance) are done in a thread, started by the
first final record, never on the event loop: final records that come before they are done
wait, in order, in memory.

A run that resumes a journal writes its output from the journal at the end
(``write_output``), since earlier runs' records are merged in. So does a run whose live
output failed (a full disk, say): the journal holds everything either way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from batcher.output.journal import Journal, decode, kept_in
from batcher.output.ordering import InputOrder, records_in_order
from batcher.records import Result, record_key

if TYPE_CHECKING:
    from batcher.output.shape import OutputShape
    from batcher.output.split import OutputFiles
    from batcher.runner.stats import RunStats

#: The largest input whose output a fresh run writes as it goes (see ``small_input``):
#: about 35,000 short requests.
LIVE_OUTPUT_MAX_BYTES = 8 * 2**20
#: The most rows a fresh run's Parquet input (counted from its footer) may have for its output
#: to be written as it goes: a Parquet file of short rows holds far more rows in 8 MiB than
#: JSONL requests do (a million one-column rows take ~5 MB).
LIVE_OUTPUT_MAX_ROWS = 50_000
#: The most bytes of rows an output written as it goes holds (Arrow buffers for Parquet, the
#: lines for JSONL) before it gives up: the input's size does not bound its answers (12,000
#: rows of 2,000-token answers come from a 73 KB CSV). Past it the rows are dropped and the
#: output is written from the journal at the end, as for a large input: memory stays bounded,
#: and only such a run's end is slower.
LIVE_OUTPUT_MAX_HELD_BYTES = 64 * 2**20
#: Parquet row groups of an output written as the run goes (from an input of at most
#: ``LIVE_OUTPUT_MAX_BYTES``), instead of the writer's 5,000: the last row group is written
#: after the last answer, so a smaller one ends the run sooner (5,000 rows took ~20 ms, 1,000
#: ~5 ms), for a file ~5 % larger.
SMALL_ROW_GROUP_SIZE = 1_000


class LiveOutput:
    """The engine's result sink: the journal first, then the output writer (final records)."""

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
        max_held: int = LIVE_OUTPUT_MAX_HELD_BYTES,
    ) -> None:
        """``metadata`` makes the output's provenance (it hashes the input: called once, in
        a thread). ``row_group_size``: Parquet's, when not the writer's default. ``shape``
        makes the output's typed columns (``OutputShape``; called once, in the same thread;
        ``None``: the plain shape). ``variants`` (the job's, in order) set the rows' order;
        ``split_errors``: failures apart; ``max_held``: the bytes of rows held before giving
        up (the output is then written from the journal at the end)."""
        self._journal = journal
        self._max_held = max_held
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
        # Final records that came before the writer was ready: written when it opens.
        self._waiting: list[Result] = []
        self._writer: OutputFiles | None = None
        # Keys whose provisional record (an answer about to be re-asked) has no final record
        # yet: if the run ends with some (the re-ask was cancelled, or its record could not be
        # journaled), the journal's answer for them is the provisional one, which this output
        # does not hold, so it is written from the journal instead.
        self._unfinished: set[str] = set()
        self.failed = False
        self.ok = 0
        self.error = 0

    def append(self, result: Result, body_hash: str, *, provisional: bool = False) -> None:
        """Journal the record (an ``OSError`` there stops the run); then write a final one."""
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
            # the record waits for them.
            self._waiting.append(result)
            self._prepare_in_thread()
            return
        self._write([result])

    def _write(self, results: list[Result]) -> None:
        """Write records (those waiting first), opening the writer with the first."""
        try:
            if self._writer is None:
                self._writer = self._open()
            if self._waiting:
                results, self._waiting = self._waiting + results, []
            for result in results:
                self._writer.write(result)
                if result.status == "ok":
                    self.ok += 1
                else:
                    self.error += 1
        except Exception:  # a full disk, or a value pyarrow refuses: not worth the run
            self._give_up()
            return
        if self._writer.held_bytes > self._max_held:
            self._give_up()  # too many answers to hold: written from the journal at the end

    def close(self, ending: Callable[[int, int], Mapping[str, str]] | None = None) -> bool:
        """Finish the output (atomically, as ``write_output`` does); false if it could not be
        written as the run went, and must be written from the journal. ``ending`` gives the
        metadata known only at the end from the output's ok and error counts."""
        if self._unfinished:
            self._give_up()
        if self.failed:
            return False
        if self._waiting:
            self._write([])  # opens the writer; a failure gives up (written from the journal)
            if self.failed:
                return False
        if self._writer is None:  # nothing was recorded: an output with no rows
            self._writer = self._open()
        if ending is not None:
            self._writer.add_metadata(ending(self.ok, self.error))
        self._writer.close()  # raises OutputError if the file cannot be finished
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
        """The writer, opened with the first record (the ``.partial`` file until ``close``)."""
        from batcher.output.rows import PLAIN
        from batcher.output.split import open_outputs
        from batcher.output.writers import DEFAULT_ROW_GROUP_SIZE

        self._prepare()
        return open_outputs(
            self._output,
            metadata=self._metadata,
            row_group_size=self._row_group_size or DEFAULT_ROW_GROUP_SIZE,
            order=self._order.of,
            split_errors=self._split_errors,
            shape=self._shape or PLAIN,
        )

    def abort(self) -> None:
        """Drop the unfinished output (the run failed); whatever was there before stays."""
        if self._writer is not None:
            self._writer.abort()

    def _give_up(self) -> None:
        """Stop writing as the run goes; the output is written from the journal at the end."""
        self.abort()
        self.failed = True
        self._writer, self._waiting = None, []  # the rows it held are freed


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
    """The output written as the run goes, for a fresh journal and a small input file
    (``small_input``); ``None``: written from the journal at the end (``write_output``)."""
    if journal.entries or not small_input(input_path):
        return None
    return LiveOutput(
        journal, output, metadata, row_group_size=SMALL_ROW_GROUP_SIZE, shape=shape,
        variants=variants, split_errors=split_errors,
    )  # fmt: skip


def small_input(path: Path) -> bool:
    """Whether a fresh run writes its output as it goes: an input file of at most
    ``LIVE_OUTPUT_MAX_BYTES`` and, for Parquet, of at most ``LIVE_OUTPUT_MAX_ROWS`` rows
    (read from its footer); stdin's size is unknown: no.

    Writing as the run goes keeps pyarrow (~35 MB) resident during the run, and the row
    groups' buffers freed among the requests' objects fragment the heap: 110 MB peak at
    100,000 requests and 129 MB at a million (bench/memory.py), where writing at the end
    peaks at 98 and 105 MB. Past this size the flat memory wins; the end's conversion
    (~30 µs a record) is then small next to the run it ends.
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
    """Finish a run's output: the live one, else (none, or it failed) from the journal; then
    compact the journal when the run recorded every request (``compaction``). ``shape``
    makes the output's typed columns (``None``: the plain shape); ``ending`` gives the
    metadata known only at the end (how the run ended) from the stats, once they hold the
    output's counts."""
    complete = not stats.stopped_early and stats.config_error is None

    def counted(ok: int, error: int) -> Mapping[str, str]:
        stats.output_ok, stats.output_error = ok, error
        return {} if ending is None else ending(stats)

    if live is not None and live.close(counted):
        if complete:
            compact_journal(journal, variants=variants, split_errors=split_errors)
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


def compact_journal(
    journal: Journal, *, variants: Sequence[str] = (), split_errors: bool = False
) -> None:
    """Compact the journal of an output written as the run went (``LiveOutput``): its rows
    are the journal's latest records in the same order."""
    from batcher.output.compaction import CompactJournal

    compacting = CompactJournal(journal)
    try:
        for record in records_in_order(journal, InputOrder(variants)):
            failed = record.get("status") != "ok"
            compacting.add(record, in_errors=split_errors and failed)
    except BaseException:
        compacting.abort()
        raise
    compacting.commit()
