"""The concurrent core: one task group owns the reader and the workers.

    reader ──[requests, bounded]──► N workers ──► journal (+ stats, progress)
    (thread-batched file     (limits, POST with retries;
     reading, resume plan)    record each result before taking the next request)

A bounded memory object stream gives backpressure, so memory stays flat whatever the input
size. A job with variants runs one ``Lane`` per variant: its own pass over the input, stream and
workers, routed among the variant's endpoints, so variants progress side by side and a slow
endpoint holds back only the variants that use it.

Each worker records its result synchronously (one ``write``, no ``await`` in between)
before it takes another request, so after a ``kill -9`` at most ``concurrency`` requests were
sent and not recorded. There are ``concurrency`` workers; ``Limits`` (adaptive concurrency,
RPM/TPM meters, 429 pauses) is waited on before every attempt, ``Budget`` (``--max-cost``)
before every request, and ``Outage`` holds requests back while the endpoint is unreachable.
On SIGINT/SIGTERM dispatch stops at once, requests in flight get ``grace_s`` to finish, and the
run returns with everything finished recorded. A refused key, an exhausted quota, a spent budget
or an outage past its patience stops dispatch too; requests that met those are not recorded,
so the next run sends them. So does a configuration error the endpoint's first answers show
(``setup_check.py``: a host that does not resolve, a URL that answers only 404): the run then
ends with ``RunStats.config_error`` set (exit 2).
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batcher.config import RetryConfig, ValidateConfig
from batcher.cost.budget import Budget
from batcher.cost.pricing import MAX_ANSWERING_MODELS, Pricer
from batcher.engine.endpoints import NEGLIGIBLE_WAIT_S, Endpoint, Router
from batcher.engine.outage import Outage
from batcher.engine.outcomes import (
    UNREACHABLE,
    answering_model,
    combined,
    cut_off,
    not_asked_again,
    reask_request,
    result_of,
    stop_reason,
    stops_the_run,
)
from batcher.engine.retry import RetryableAttempt, Sleep, retry_policy
from batcher.engine.setup_check import SetupCheck, waiting_note
from batcher.engine.usage_check import checked as usage_checked
from batcher.engine.validation import Verdict, check_answer, expected_format
from batcher.engine.warm_up import WarmUp
from batcher.errors import InputError
from batcher.http.client import Attempt, ChatClient
from batcher.input.idset import IdSet
from batcher.input.requests import LateCounter
from batcher.limits.endpoint import Limits
from batcher.limits.overload import classify_429
from batcher.output.resume import ResumePlan
from batcher.records import Reject, Request, Result
from batcher.runner.progress import Progress
from batcher.runner.stats import RunStats

#: Lines read per trip to the reading thread (the first trips fewer: runner.FIRST_READ_BATCH).
READ_BATCH = 256
#: A pause the rate-limit headers ask for that is long enough to say so.
LONG_PAUSE_S = 30.0
#: With several endpoints and none with room, how often a waiting request looks again.
REROUTE_S = 0.1


@dataclass(frozen=True, kw_only=True)
class Lane:
    """One variant's share of a run: its line batches and the endpoints it may use (all of the
    engine's when ``None``). Lanes read the same input, so a line that every variant rejects
    is written to the rejects file and counted by whichever lane comes to it first, once.
    """

    batches: Iterator[list[Request | Reject]]
    endpoints: Sequence[Endpoint] | None = None


class ResultSink(Protocol):
    def append(self, result: Result, body_hash: str, *, provisional: bool = False) -> None: ...


class RejectSink(Protocol):
    def write(self, reject: Reject) -> None: ...


class Engine:
    """Runs requests from an iterator of line batches through the pool into the sinks."""

    def __init__(
        self,
        *,
        client: ChatClient | None = None,
        limits: Limits | None = None,
        endpoints: Sequence[Endpoint] | None = None,
        retry: RetryConfig,
        concurrency: int,
        results: ResultSink,
        rejects: RejectSink,
        stats: RunStats,
        progress: Progress,
        plan: ResumePlan | None = None,
        pricer: Pricer | None = None,
        budget: Budget | None = None,
        grace_s: float = 10.0,
        outage_patience_s: float = 1800.0,
        validate: ValidateConfig | None = None,
        encoding: str | None = None,
        warm_up: Callable[[], object] | None = None,
        on_token_limit: Callable[[], object] | None = None,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        """``warm_up`` runs in a thread once the first requests are out (see ``WarmUp``):
        work the run needs at its end (the runner imports the output writer), done while the
        first answers are awaited (the probe's, when there is one: see ``Limits``).
        ``on_token_limit``: see ``requests.LateCounter``'s ``on_first``."""
        if endpoints is None:
            if client is None or limits is None:
                raise ValueError("give client and limits, or endpoints")
            outage = Outage(patience_s=outage_patience_s)
            endpoints = [Endpoint(name="default", client=client, limits=limits, outage=outage)]
        self._router = Router(endpoints)
        self._setup = {e.name: SetupCheck(e.client.url) for e in endpoints}
        self._retry = retry
        self._concurrency = concurrency
        self._results = results
        self._rejects = rejects
        self._stats = stats
        self._progress = progress
        self._plan = plan
        self._pricer = pricer or Pricer()
        self._budget = budget
        self._validate = validate if validate is not None and validate.json_schema else None
        self._grace_s = grace_s
        self._encoding = encoding  # the job's [limits] encoding, for prompts counted here
        self._warm_up = WarmUp(warm_up)
        self._late_counter = LateCounter(encoding, on_first=on_token_limit)
        self._sleep = sleep
        self._stopping = anyio.Event()
        self._record_error: OSError | None = None
        self._work_scope = anyio.CancelScope()
        self._read_scopes: list[anyio.CancelScope] = []
        self._rejected_lines: IdSet | None = None
        self._signalled = False
        self._signal_scope = anyio.CancelScope()

    async def run(
        self,
        batches: Iterator[list[Request | Reject]] | Sequence[Lane],
        *,
        handle_signals: bool = False,
    ) -> RunStats:
        """Process every batch (of every lane); return the statistics (also kept in ``stats``).

        One lane (an iterator of batches) gets the engine's ``concurrency`` workers; with
        several, each lane gets as many workers as its endpoints allow in flight.
        """
        start = time.monotonic()
        lanes = [Lane(batches=batches)] if isinstance(batches, Iterator) else list(batches)
        if len(lanes) > 1:
            self._rejected_lines = IdSet()  # a line rejected by every variant counts once
        try:
            async with anyio.create_task_group() as outer:
                if handle_signals:
                    outer.start_soon(self._watch_signals)
                outer.start_soon(self._warm_up.run)
                with self._work_scope:
                    async with anyio.create_task_group() as work:
                        for lane in lanes:
                            self._start_lane(work, lane)
                if self._stats.config_error is None:
                    for setup in self._setup.values():  # too few 404s to tell: they are errors
                        self._record_all(setup.release())
                self._signal_scope.cancel()
                self._warm_up.cancel()
        finally:
            if self._rejected_lines is not None:
                self._rejected_lines.close()
        self._stats.wall_s = time.monotonic() - start
        return self._stats

    def _start_lane(self, work: anyio.abc.TaskGroup, lane: Lane) -> None:
        router = self._router
        workers = self._concurrency
        if lane.endpoints is not None:
            router = Router(lane.endpoints)
            workers = sum(e.limits.max_concurrency for e in lane.endpoints)
        req_send, req_recv = anyio.create_memory_object_stream[Request](2 * workers)
        started = 0

        def spawn() -> None:
            """One more worker, up to ``workers``: started as requests are read, so a short
            input never pays for a large pool it cannot use."""
            nonlocal started
            if started < workers:
                started += 1
                work.start_soon(self._work, req_recv.clone(), router)
                if started == workers:
                    req_recv.close()

        async def read() -> None:
            try:
                await self._read(lane.batches, req_send, spawn)
            finally:
                req_recv.close()  # the workers hold their own clones

        work.start_soon(read)

    def stop(self, reason: str, *, at_once: bool = False, quiet: bool = False) -> None:
        """Stop dispatching; requests in flight may finish (cancelled now if ``at_once``).

        Only the first reason counts; a second stop never cuts off answers in flight (only a
        second Ctrl+C does, in ``_watch_signals``). ``quiet``: no note (the caller tells).
        """
        if at_once:
            self._work_scope.cancel()
        for scope in self._read_scopes:  # a reader may wait on a slow pipe: nothing more to read
            scope.cancel()
        if self._stopping.is_set():
            return
        self._stats.stopped_early = True
        self._stats.stop_reason = reason
        self._stopping.set()
        if quiet:
            return
        if at_once:
            self._progress.note(f"batcher: {reason}: stopping")
            return
        self._progress.note(f"batcher: {reason}: no new requests; letting those in flight finish")

    def stop_within(self, reason: str, grace_s: float) -> None:
        """Stop as ``stop`` does, and cut off the requests still in flight after ``grace_s``
        (what a first Ctrl+C does; the Ray engine's workers when the driver is interrupted)."""
        self.stop(reason)
        self._work_scope.deadline = min(self._work_scope.deadline, anyio.current_time() + grace_s)

    @property
    def record_error(self) -> OSError | None:
        """The error that stopped the journal, if any."""
        return self._record_error

    async def _read(
        self,
        batches: Iterator[list[Request | Reject]],
        send: MemoryObjectSendStream[Request],
        spawn: Callable[[], None],
    ) -> None:
        scope = anyio.CancelScope()
        self._read_scopes.append(scope)
        if self._stopping.is_set():
            scope.cancel()
        with scope:
            await self._read_all(batches, send, spawn)

    async def _read_all(
        self,
        batches: Iterator[list[Request | Reject]],
        send: MemoryObjectSendStream[Request],
        spawn: Callable[[], None],
    ) -> None:
        async with send:
            while not self._stopping.is_set():
                # File reading and JSON parsing run in a thread, a batch at a time, so a slow
                # stdin never blocks the event loop.
                try:
                    batch = await anyio.to_thread.run_sync(
                        next, batches, None, abandon_on_cancel=True
                    )
                except InputError as exc:
                    self.stop(str(exc))  # what was read is sent; the rest waits for a re-run
                    return
                if batch is None:
                    return
                for item in batch:
                    if isinstance(item, Reject):
                        seen = self._rejected_lines
                        if seen is None or seen.add(str(item.line)):
                            try:
                                self._rejects.write(item)
                            except OSError as exc:
                                self.stop(f"cannot write the rejects file: {exc.strerror or exc}")
                                return
                            self._stats.rejected += 1
                        self._progress.advance()
                    elif self._plan and self._plan.decide(item.key, item.body_hash) == "skip":
                        self._stats.skipped += 1
                        self._progress.advance()
                    else:
                        spawn()
                        try:
                            try:
                                send.send_nowait(item)  # no trip round the loop when there is room
                            except anyio.WouldBlock:
                                await send.send(item)
                        except anyio.BrokenResourceError:
                            return  # every worker has stopped

                    if self._stopping.is_set():
                        return

    async def _work(self, recv: MemoryObjectReceiveStream[Request], router: Router) -> None:
        async with recv:
            while (request := await _next_request(recv)) is not None:
                if self._stopping.is_set():
                    return  # not sent: it is left for the next run
                result = await self._ask(request, router)
                if result is None:
                    return  # the budget is spent: this one and the rest wait for a re-run
                reasks = 0
                if self._validate is not None and result.status == "ok":
                    result, reasks = await self._check_format(request, result, router)
                if result.error_code == "connection_error" and router.all_exhausted:
                    continue  # not recorded: the endpoints are down, a re-run sends it
                if self._stats.config_error is not None and result.status != "ok":
                    continue  # not recorded: after the job is fixed, a re-run sends it
                if self._stopping.is_set() and cut_off(result):
                    continue  # a stop (Ctrl+C, say) cut its retries short: a re-run sends it
                setup = self._setup.get(result.endpoint or "")
                if setup is not None and setup.hold(result, request.body_hash):
                    continue  # maybe one of a wrong URL's 404s: recorded once that is known
                if stops_the_run(result):
                    # Not recorded: after the key or the quota is fixed, a re-run sends it.
                    self.stop(stop_reason(result))
                    continue
                self._record(result, request.body_hash, reasks=reasks)

    async def _ask(self, request: Request, router: Router, *, first: bool = True) -> Result | None:
        """Send a request (with its retries) under the budget; its result, priced.

        ``None`` when the budget cannot take it (the run is stopping). ``first`` is false for
        a re-ask, which is not another submitted request.
        """
        pricer = self._pricer
        asked = request.body.get("model")
        if not pricer.known(asked):
            # A price lookup can take 0.3 s: never on the event loop. Under --max-cost the
            # reservation needs it now; otherwise it is made while the request is out.
            if self._budget is not None:
                await anyio.to_thread.run_sync(pricer.price, asked)
            else:
                pricer.prefetch(asked)
        reserved = self._reserve(request)
        if reserved is None:
            return None
        self._warm_up.start()
        if first:
            self._stats.submitted += 1
            if self._plan and self._plan.known(request.key):
                self._stats.resent += 1
        started = time.time()
        sent = await self._send(request, router, reserved)
        last, attempts, where = sent.last, sent.attempts, sent.where
        last = usage_checked(request, last)  # usage that cannot be true is dropped, and said
        model = answering_model(request, last)
        if not pricer.ready(asked, model, last.usage):
            await anyio.to_thread.run_sync(pricer.cost_of, asked, model, last.usage)
        cost = pricer.cost_of(asked, model, last.usage)
        if self._budget is not None:
            # An answer without (valid) usage may have been billed, and so may a 2xx that
            # could not be used: count its worst case, and record that figure (with what the
            # retried ones were charged), so a resumed run's budget starts from it too.
            if pricer.answering_models_capped and not self._stopping.is_set():
                self.stop(
                    f"--max-cost: the endpoint named more than {MAX_ANSWERING_MODELS} models in "
                    "its answers; an answer's cost can no longer be known, so the cap cannot hold"
                )
            if not sent.reserved:
                cost = None  # ``last`` went unretried for the budget: in ``sent.charged``
            else:
                if cost is None and (last.ok or _maybe_billed(last)):
                    cost = reserved
                if self._budget.settle(reserved, cost or 0.0):
                    self.stop(self._budget.overshoot(cost or 0.0, reserved, asked, model))
            if sent.charged:
                cost = (cost or 0.0) + sent.charged
        # Built once, priced: replacing a field of a frozen Result costs more than building it
        return result_of(request, last, attempts, started, where, model=model, cost=cost)

    async def _check_format(
        self, request: Request, result: Result, router: Router
    ) -> tuple[Result, int]:
        """Check an ok answer against the request's ``response_format``; re-ask while invalid.

        Returns the result and the re-asks sent. The result keeps the last ok answer; its
        attempts, usage and cost add up every ask. Before each re-ask the answer so far is
        journaled (provisionally), so a crash mid-way does not lose what was paid for.
        """
        assert self._validate is not None
        expected = expected_format(request.body)
        if expected is None:
            return result, 0
        verdict = check_answer(result.body, expected)
        asked, reasks = request, 0
        while verdict.valid is False and verdict.reask and reasks < self._validate.max_reasks:
            if self._stopping.is_set() or not self._journal_provisionally(request, result, verdict):
                verdict = not_asked_again(verdict)
                break
            asked = reask_request(asked, result.body, verdict)
            answer = await self._ask(asked, router, first=False)
            if answer is None:  # the budget is spent
                verdict = not_asked_again(verdict)
                break
            reasks += 1
            result = combined(result, answer)
            if answer.status != "ok":
                failed = f"{verdict.error}; re-ask {reasks} failed: {answer.error_code}"
                verdict = Verdict(False, failed)
                break
            verdict = check_answer(result.body, expected)
        checked = dataclasses.replace(
            result, schema_valid=verdict.valid, schema_error=verdict.error
        )
        return checked, reasks

    def _journal_provisionally(self, request: Request, result: Result, verdict: Verdict) -> bool:
        """Journal an invalid answer before it is re-asked; false if the journal failed."""
        pending = dataclasses.replace(
            result, schema_valid=False, schema_error=f"{verdict.error} (re-ask under way)"
        )
        return self._journal(pending, request.body_hash, provisional=True)

    def _reserve(self, request: Request) -> float | None:
        """Reserve the request's worst-case cost under ``--max-cost``; ``None`` if it cannot go
        (the run then stops, saying why)."""
        if self._budget is None:
            return 0.0
        model = request.body.get("model")
        price = self._pricer.price(model if isinstance(model, str) else None)
        reserved = self._budget.reserve_for(request, price, self._encoding)
        if isinstance(reserved, str):
            self.stop(reserved)
            return None
        return reserved

    def _record(self, result: Result, body_hash: str, *, reasks: int = 0) -> None:
        """Journal a finished request, then count it: synchronous, so nothing interleaves."""
        if self._journal(result, body_hash):
            self._stats.add(result)
            self._stats.reasks += reasks
            self._progress.advance()

    def _record_all(self, results: list[tuple[Result, str]]) -> None:
        for result, body_hash in results:
            self._record(result, body_hash)

    def _journal(self, result: Result, body_hash: str, *, provisional: bool = False) -> bool:
        """Append to the journal; on failure stop the run at once and return false."""
        if self._record_error is not None:
            return False  # the journal already failed: this answer is lost and will be re-sent
        try:
            self._results.append(result, body_hash, provisional=provisional)
        except OSError as exc:
            self._record_error = exc
            self.stop(f"cannot write the journal: {exc.strerror or exc}", at_once=True)
            return False
        return True

    async def _send(self, request: Request, router: Router, reserved: float = 0.0) -> _Sent:
        """The request's last attempt (after its retries), how many times it was sent, and
        the endpoint that made that attempt.

        Under ``--max-cost`` a 2xx that could not be used (broken, empty, an error object, too
        large) may have been billed: before it is retried it is charged at its worst case
        (``reserved``) and the retry reserves again; when the budget cannot take the retry,
        the run stops and the request ends with that attempt.
        """
        last, attempts, where = await self._attempt(request, router)
        charged, live = 0.0, True
        if last.retryable and self._retry.max_attempts > 1:
            try:
                async for attempt in retry_policy(self._retry, sleep=self._sleep, first=last):
                    with attempt:
                        if self._budget is not None and _maybe_billed(last):
                            charged += reserved
                            live = self._charge_and_reserve_again(reserved)
                            if not live:
                                break
                        last, sends, where = await self._attempt(request, router)
                        attempts += sends
                        if last.retryable:
                            raise RetryableAttempt(last)
            except RetryableAttempt:
                pass  # retries exhausted: ``last`` is the final failed attempt
        return _Sent(last, attempts, where, charged, reserved=live)

    def _charge_and_reserve_again(self, reserved: float) -> bool:
        """Count an unusable 2xx at its worst case and reserve for its retry; false (the run
        stopping) when the budget cannot take the retry."""
        assert self._budget is not None
        self._budget.settle(reserved, reserved)
        if self._budget.try_reserve(reserved):
            return True
        self.stop(
            f"--max-cost ${self._budget.cap:g} reached: ${self._budget.spent:.4f} spent, "
            "answers that could not be used counted at their worst case (they may have "
            "been billed)"
        )
        return False

    async def _attempt(self, request: Request, router: Router) -> tuple[Attempt, int, str | None]:
        """One attempt, at the endpoint the router picks, within its limits; the answer steers
        those limits.

        While an endpoint is down (see ``outage.py``) failed connections are not returned as
        attempts: the request goes to another endpoint, or waits for the next probe, instead
        of using up its retries. Returns the attempt, how many times the request was sent for
        it, and the name of the endpoint that made it.
        """
        sends = 0
        while True:
            endpoint = await self._route(router)
            if endpoint is None:  # the run is stopping: do not knock on dead endpoints
                return UNREACHABLE, sends, None
            sends += 1
            endpoint.assigned += 1
            try:
                attempt, request, charged = await self._post(endpoint, request)
            finally:
                endpoint.assigned -= 1
            limits, outage = endpoint.limits, endpoint.outage
            endpoint.record(attempt.ok or not attempt.retryable)
            if self._check_setup(endpoint, attempt):
                # neither retried nor recorded: the job is set up wrong
                return dataclasses.replace(attempt, retryable=False), sends, endpoint.name
            if attempt.status_code is not None:
                self._endpoint_answered(endpoint)  # any HTTP answer: the endpoint is up
                break
            if attempt.error_code != "connection_error":
                break  # a timeout: a slow server is not a down one; the outage state stays
            wait = outage.failed()
            if wait is None:
                if router.another_is_up(endpoint):
                    continue  # fail over at once: the request did not reach a server
                break  # an ordinary failure: the retry policy handles it
            if outage.exhausted:
                if not router.all_exhausted:
                    continue  # that one is given up on; the others take its requests
                if not self._router.all_exhausted:
                    # This variant's endpoints are gone, others still work: the variant's
                    # requests are left unrecorded for a re-run while the others go on.
                    self._give_up_on(router, outage.patience_s, attempt.error_message)
                    return attempt, sends, endpoint.name
                self.stop(
                    f"the endpoint{'s have' if len(self._router.endpoints) > 1 else ' has'} "
                    f"been unreachable for {outage.patience_s:g} s ({attempt.error_message}); "
                    "check, then run the same command again"
                )
                return attempt, sends, endpoint.name
            if outage.note_due(wait):  # at its start, then at least once a minute
                label = self._label(endpoint)
                self._progress.set_status(f"WAITING: {label} unreachable")
                self._progress.note(waiting_note(label, endpoint.client.url, attempt, outage))
            if self._stopping.is_set():
                return attempt, sends, endpoint.name  # stopping: no more probes
            limits.enter_outage(wait)
        if attempt.headers and limits.observe(attempt.headers) >= LONG_PAUSE_S:
            self._progress.note(
                f"batcher: {self._label(endpoint)} says nothing remains of its rate limit for "
                f"{limits.paused_s:.0f} s (x-ratelimit-remaining-* 0 until its reset); waiting"
            )
        if attempt.ok and endpoint.remember is not None:
            endpoint.remember(limits)  # what it announced (or that it announced nothing)
            endpoint.remember = None
        if attempt.status_code == 429:
            error = f"{attempt.error_code} {attempt.error_message}"
            verdict = classify_429(attempt.headers, error, request.est_tokens)
            limits.on_rate_limited(attempt.retry_after, verdict)
        elif attempt.status_code is not None:
            limits.answered()
        if charged is None:
            pass  # no TPM meter was charged for this attempt: nothing to correct
        elif attempt.status_code is None or attempt.status_code == 429:
            limits.correct_tokens(charged, 0)  # not admitted: nothing was charged
        elif request.prompt_tokens is None:
            pass  # charged its completion budget alone (sent as the meter appeared): keep it
        elif attempt.usage is not None and attempt.usage.prompt_tokens is not None:
            # The server charges its own prompt count (plus the same completion budget).
            limits.correct_tokens(
                charged, charged - request.prompt_tokens + attempt.usage.prompt_tokens
            )
        return attempt, sends, endpoint.name

    def _check_setup(self, endpoint: Endpoint, attempt: Attempt) -> bool:
        """Note what an attempt says of the job's setup (``setup_check.py``); true if the
        run stops on a configuration error and the attempt failed (it is then not retried,
        and not recorded). An ok answer records the results held back at its endpoint."""
        setup = self._setup[endpoint.name]
        problem = setup.check(attempt)
        if problem is not None and self._stats.config_error is None:
            self._stats.config_error = problem
            self._stats.config_error_endpoint = endpoint.name
            self.stop(problem, quiet=True)  # the caller says it, once, as an error
        if attempt.ok and setup.holding:
            self._record_all(setup.release())
        return self._stats.config_error is not None and not attempt.ok

    def _give_up_on(self, router: Router, patience_s: float, error: str | None) -> None:
        """Some endpoints (one variant's) are past their patience while others work: the run
        finishes the rest and ends as stopped early, so a re-run sends what they could not."""
        names = ", ".join(e.name for e in router.endpoints)
        if self._stats.stop_reason is None:
            self._progress.note(
                f"batcher: endpoint {names} unreachable for {patience_s:g} s ({error}); "
                "its requests are left for a re-run"
            )
        self._stats.stopped_early = True
        self._stats.stop_reason = self._stats.stop_reason or (
            f"endpoint {names} was unreachable for {patience_s:g} s; run the same command again"
        )

    async def _route(self, router: Router) -> Endpoint | None:
        """The endpoint for the next attempt. With several, a request waits for one with room
        rather than queue at one: a queue at an endpoint that goes down would be stuck there
        until it comes back, while the others could have taken it."""
        while True:
            endpoint = router.choose()
            if endpoint is None or len(router.endpoints) == 1:
                return endpoint
            wait = endpoint.wait_s()
            room = endpoint.assigned < endpoint.limits.concurrency.total_tokens
            if room and wait <= NEGLIGIBLE_WAIT_S:
                return endpoint
            await anyio.sleep(min(wait, REROUTE_S) if room else REROUTE_S)

    async def _post(
        self, endpoint: Endpoint, request: Request
    ) -> tuple[Attempt, Request, int | None]:
        """POST within the endpoint's concurrency, pause and rate limits.

        Returns the attempt, the request as sent (its prompt counted if it was read uncounted
        and the endpoint has a TPM meter by now: a server announced a token limit) and the
        tokens charged to that meter (``None`` if none was).
        """
        limits = endpoint.limits
        # acquire_nowait first: anyio's acquire() yields to the loop even when a slot is
        # free, an extra trip round the event loop for every request.
        limiter = limits.concurrency
        try:
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            await limiter.acquire()
        try:
            if request.prompt_tokens is None and limits.tpm is not None:
                request = await self._late_counter.counted(request)
            tokens = request.est_tokens
            metered = await limits.acquire(tokens)
            try:
                attempt = await endpoint.client.post(request.body)
            finally:
                limits.release(tokens)
        finally:
            limiter.release()
        return attempt, request, tokens if metered else None

    def _label(self, endpoint: Endpoint) -> str:
        return "the endpoint" if len(self._router.endpoints) == 1 else f"endpoint {endpoint.name}"

    def _endpoint_answered(self, endpoint: Endpoint) -> None:
        lasted = endpoint.outage.answered()
        if lasted is not None:
            endpoint.limits.leave_outage()
            if not any(e.outage.active for e in self._router.endpoints):
                self._progress.set_status("")
            self._progress.note(f"batcher: {self._label(endpoint)} is back after {lasted:.0f} s")

    async def _watch_signals(self) -> None:
        with self._signal_scope, anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
            async for signum in sigs:
                if self._signalled:  # asked twice: stop now
                    self._work_scope.cancel()
                    continue
                self._signalled = True
                self.stop_within(f"interrupted by {signal.Signals(signum).name}", self._grace_s)
                self._progress.note(
                    f"batcher: waiting up to {self._grace_s:g} s for requests in flight "
                    "(press Ctrl+C again to stop at once)"
                )


class _Sent(NamedTuple):
    """What ``Engine._send`` returns: the last attempt, the sends, the endpoint that made the
    last attempt, the dollars charged for unusable 2xx answers retried, and whether the
    request's reservation is still held (to settle). A tuple: one is made per request."""

    last: Attempt
    attempts: int
    where: str | None
    charged: float = 0.0
    reserved: bool = True


def _maybe_billed(attempt: Attempt) -> bool:
    """A 2xx that could not be used: the server answered, and may have billed it."""
    status = attempt.status_code
    return not attempt.ok and status is not None and 200 <= status < 300


async def _next_request(recv: MemoryObjectReceiveStream[Request]) -> Request | None:
    """The next request, ``None`` at the end; without a trip round the event loop when one is
    waiting (``receive()`` always makes one): the worker yields soon enough, on its request."""
    try:
        return recv.receive_nowait()
    except anyio.WouldBlock:
        pass
    except anyio.EndOfStream:
        return None
    try:
        return await recv.receive()
    except anyio.EndOfStream:
        return None
