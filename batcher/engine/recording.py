"""What becomes of a finished request: journaled and counted, held back, or left for a re-run.

Each result is journaled and counted synchronously (one ``append``, no ``await`` in between),
so after a ``kill -9`` at most ``concurrency`` requests were sent and not recorded. Some are
not recorded, so the next run sends them: those cut short by a stop, those that met an
endpoint that is down or set up wrong, and answers that stop the run (a refused key, an
exhausted quota). An endpoint's first answers may be held back until they tell a wrong base
URL from a few missing models (``setup_check.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from batcher.engine.control import RunControl, Sinks
from batcher.engine.endpoints import Endpoint, Router
from batcher.engine.outcomes import cut_off, stop_reason, stops_the_run
from batcher.engine.setup_check import SetupCheck
from batcher.http.answers import Attempt
from batcher.records import Request, Result


class Recorder:
    """Journals and counts finished requests; watches each endpoint's setup."""

    def __init__(self, sinks: Sinks, control: RunControl, endpoints: Sequence[Endpoint]) -> None:
        self._results = sinks.results
        self._stats = sinks.stats
        self._progress = sinks.progress
        self._control = control
        self._setup = {e.name: SetupCheck(e.client.url) for e in endpoints}
        #: The error that stopped the journal, if any.
        self.error: OSError | None = None

    def finish(self, request: Request, result: Result, router: Router, reasks: int) -> None:
        """Record a request's final result, unless it is left for a re-run (see the module)."""
        stats = self._stats
        if result.error_code == "connection_error" and router.all_exhausted:
            return  # the endpoints are down: a re-run sends it
        if stats.config_error is not None and result.status != "ok":
            return  # after the job is fixed, a re-run sends it
        if self._control.stopping.is_set() and cut_off(result):
            return  # a stop (Ctrl+C, say) cut its retries short: a re-run sends it
        setup = self._setup.get(result.endpoint or "")
        if setup is not None and setup.hold(result, request.body_hash):
            return  # maybe one of a wrong URL's 404s: recorded once that is known
        if stops_the_run(result):
            # Not recorded: after the key or the quota is fixed, a re-run sends it.
            self._control.stop(stop_reason(result))
            return
        self.record(result, request.body_hash, reasks=reasks)

    def record(self, result: Result, body_hash: str, *, reasks: int = 0) -> None:
        """Journal a finished request, then count it: synchronous, so nothing interleaves."""
        if self.journal(result, body_hash):
            self._stats.add(result)
            self._stats.reasks += reasks
            self._progress.advance()

    def journal(self, result: Result, body_hash: str, *, provisional: bool = False) -> bool:
        """Append to the journal; on failure stop the run at once and return false."""
        if self.error is not None:
            return False  # the journal already failed: this answer is lost and will be re-sent
        try:
            self._results.append(result, body_hash, provisional=provisional)
        except OSError as exc:
            self.error = exc
            self._control.stop(f"cannot write the journal: {exc.strerror or exc}", at_once=True)
            return False
        return True

    def check_setup(self, endpoint: Endpoint, attempt: Attempt) -> bool:
        """Note what an attempt says of the job's setup (``setup_check.py``); true if the
        run stops on a configuration error and the attempt failed (it is then not retried,
        and not recorded). An ok answer records the results held back at its endpoint."""
        setup = self._setup[endpoint.name]
        problem = setup.check(attempt)
        stats = self._stats
        if problem is not None and stats.config_error is None:
            stats.config_error = problem
            stats.config_error_endpoint = endpoint.name
            self._control.stop(problem, quiet=True)  # the caller says it, once, as an error
        if attempt.ok and setup.holding:
            self._record_all(setup.release())
        return stats.config_error is not None and not attempt.ok

    def release_held(self) -> None:
        """At the end of a run without a configuration error: what is still held back (too
        few 404s to tell) is recorded, as the errors it is."""
        if self._stats.config_error is None:
            for setup in self._setup.values():
                self._record_all(setup.release())

    def _record_all(self, results: list[tuple[Result, str]]) -> None:
        for result, body_hash in results:
            self.record(result, body_hash)
