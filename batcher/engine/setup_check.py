"""Signs in an endpoint's first answers that the job is set up wrong, where waiting cannot help.

Two such signs stop the run with a configuration error (exit 2) instead of one error record per
line or a wait that would last the whole outage patience:

* the endpoint's host name does not exist (a DNS failure) before it ever answered: a typo in
  ``base_url``. A host that answered earlier in the run and then stops resolving is an outage
  (``outage.py``): the network or its resolver may come back.
* ``WRONG_PATH_AFTER`` answers of 404 or 405 and no success yet at that endpoint: the base URL
  is not where ``/chat/completions`` lives (a missing ``/v1``, or one that already ends in
  ``/chat/completions``). A 404 that names a model (``model_not_found``, "the model `x` does
  not exist") is about that request's model, not the URL: it stays an error of the request.

Results that may turn out to be such 404s are held back, not recorded, until the endpoint
answers a request with success (they are recorded then: a 404 among successes is the request's
own error) or the run ends (recorded too: too few to tell). When the run stops for a
configuration error they are dropped, so a re-run after the fix sends them.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from batcher.engine.outage import Outage
from batcher.http.answers import Attempt
from batcher.http.redact import redact_url
from batcher.records import Result

#: 404/405 answers, with no success yet at the endpoint, that stop the run.
WRONG_PATH_AFTER = 5
#: What a server answers for a path it does not serve, or a method it does not take there.
_WRONG_PATH_STATUSES = (404, 405)


def is_wrong_path(status_code: int | None, error_code: str | None, message: str | None) -> bool:
    """A 404/405 that says nothing of a model: the URL, not the request, is wrong."""
    if status_code not in _WRONG_PATH_STATUSES:
        return False
    return "model" not in f"{error_code or ''} {message or ''}".lower()


def origin(url: str) -> str:
    """``scheme://host:port`` of a URL, without user or password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, "", "", ""))


class SetupCheck:
    """What one endpoint's answers so far say about the job's setup (see the module)."""

    def __init__(self, url: str) -> None:
        self.url = url  # where requests are POSTed
        self.answered = False  # any HTTP answer yet
        self.succeeded = False  # an ok answer yet
        self.wrong_paths = 0
        self._held: list[tuple[Result, str]] = []

    def check(self, attempt: Attempt) -> str | None:
        """Note an attempt; the configuration error it shows, if it shows one."""
        if attempt.status_code is None:
            if attempt.connect_failure == "dns" and not self.answered:
                host = urlsplit(self.url).hostname
                base_url = redact_url(self.url).removesuffix("/chat/completions")
                return f"host {host!r} does not resolve ({base_url}); check the URL"
            return None
        self.answered = True
        if attempt.ok:
            self.succeeded = True
        elif not self.succeeded and is_wrong_path(
            attempt.status_code, attempt.error_code, attempt.error_message
        ):
            self.wrong_paths += 1
            if self.wrong_paths >= WRONG_PATH_AFTER:
                return (
                    f"{redact_url(self.url)} answered {attempt.status_code} to "
                    f"{self.wrong_paths} requests and nothing else: base_url should end before "
                    "/chat/completions, usually in /v1"
                )
        return None

    def hold(self, result: Result, body_hash: str) -> bool:
        """Hold a result back (true) while it may be one of the 404s of a wrong URL."""
        if self.succeeded or not is_wrong_path(
            result.status_code, result.error_code, result.error_message
        ):
            return False
        self._held.append((result, body_hash))
        return True

    @property
    def holding(self) -> bool:
        """Whether results are held back."""
        return bool(self._held)

    def release(self) -> list[tuple[Result, str]]:
        """The results held back, to be recorded now (none are held afterwards)."""
        held, self._held = self._held, []
        return held


def waiting_note(label: str, url: str, attempt: Attempt, outage: Outage) -> str:
    """What the run says while an endpoint is down (at its start, then about once a minute).

    Before the endpoint ever answered, a refused connection most likely means its server is
    still starting (loading a model can take minutes): the note says so.
    """
    patience = f"patience {outage.patience_s:g} s"
    down_for = outage.down_for_s
    if not outage.ever_answered and attempt.connect_failure == "refused":
        after = f" after {down_for:.0f} s" if down_for >= 1 else ""
        return (
            f"batcher: nothing listens at {origin(url)} yet{after} (connection refused); "
            f"waiting for the server to start ({patience})"
        )
    if down_for < 1:
        return (
            f"batcher: {label} is unreachable ({attempt.error_message}); "
            f"waiting, probing with one request ({patience})"
        )
    return (
        f"batcher: {label} still unreachable after {down_for:.0f} s "
        f"({attempt.error_message}); waiting ({patience})"
    )
