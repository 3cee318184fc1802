"""A page rendered by headless Chromium over the DevTools protocol: its screenshot, its console
errors, the requests it made, and whether anything is wider than the window.

Chromium is started with every host name mapped to "not found", so a page that tried to fetch
something could not; the Network domain still reports the attempt. Used by the report's
browser test and by ``bench/report_screenshot.py``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from tests.helpers import free_port

#: Elements wider than their box (a table, a chart, a long path cut off at the page edge).
_OVERFLOW_JS = """
(() => {
  const out = [];
  if (document.documentElement.scrollWidth > window.innerWidth + 1)
    out.push('page ' + document.documentElement.scrollWidth + ' > ' + window.innerWidth);
  for (const e of document.querySelectorAll('figure, table, pre, dl, header, section')) {
    if (e.scrollWidth > e.clientWidth + 1) out.push((e.id || e.tagName) + ' ' + e.scrollWidth);
  }
  return JSON.stringify(out);
})()
"""


def chromium_path() -> str | None:
    """The Chromium (or Chrome) on this machine, if any."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Rendered:
    """What rendering a page showed."""

    png: bytes = b""
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    overflowing: list[str] = field(default_factory=list)
    title: str = ""
    loaded: bool = False


def render(page: Path, *, width: int = 1400, height: int = 900) -> Rendered:
    """Open ``page`` in headless Chromium at ``width`` × ``height`` CSS pixels; the screenshot
    covers the whole page."""
    browser = chromium_path()
    if browser is None:
        raise RuntimeError("no chromium on this machine")
    port = free_port()
    # a helper of the browser may still write to the profile while it is removed: a profile
    # left in the temporary folder, rather than a test failed after its assertions passed
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [
                browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--hide-scrollbars", "--disable-extensions", "--disable-background-networking",
                "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
                f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
                f"--window-size={width},{height}", "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: ended whole, with its helpers
        )  # fmt: skip
        try:
            return anyio.run(_render, port, page.resolve().as_uri(), width, height)
        finally:
            _stop(proc)


def _stop(browser: subprocess.Popen[bytes]) -> None:
    """End the browser, then whatever of its process group outlived it (renderers, the crash
    handler), which would go on writing to the profile."""
    _signal_group(browser.pid, signal.SIGTERM)
    try:
        browser.wait(10)
    except subprocess.TimeoutExpired:
        browser.kill()
        browser.wait()
    _signal_group(browser.pid, signal.SIGKILL)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


async def _render(port: int, url: str, width: int, height: int) -> Rendered:
    async with aiohttp.ClientSession() as http:
        target = await _page_target(http, port)
        async with http.ws_connect(target, max_msg_size=0) as ws:
            return await _drive(ws, url, width, height)


async def _page_target(http: aiohttp.ClientSession, port: int) -> str:
    """The DevTools websocket of the browser's first page, once it listens."""
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(aiohttp.ClientError, ValueError):
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                for item in await r.json():
                    if item.get("type") == "page":
                        return str(item["webSocketDebuggerUrl"])
        if time.monotonic() > deadline:
            raise RuntimeError("chromium's DevTools did not answer in 30 s")
        await anyio.sleep(0.1)


async def _drive(
    ws: aiohttp.ClientWebSocketResponse, url: str, width: int, height: int
) -> Rendered:
    """Load ``url`` with the console, log and network watched; measure and screenshot it."""
    ids = itertools.count(1)
    seen = Rendered()

    async def call(method: str, **params: Any) -> dict[str, Any]:
        my = next(ids)
        await ws.send_json({"id": my, "method": method, "params": params})
        while True:
            message = await ws.receive_json(timeout=30)
            if message.get("id") == my:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            _note(seen, message)

    for domain in ("Page", "Runtime", "Log", "Network"):
        await call(f"{domain}.enable")
    await call("Page.navigate", url=url)
    with anyio.fail_after(30):
        while not seen.loaded:  # the load event may come before navigate's answer
            _note(seen, await ws.receive_json())
    title = await call("Runtime.evaluate", expression="document.title", returnByValue=True)
    seen.title = str(title["result"].get("value", ""))
    found = await call("Runtime.evaluate", expression=_OVERFLOW_JS, returnByValue=True)
    seen.overflowing = json.loads(found["result"]["value"])
    metrics = await call("Page.getLayoutMetrics")
    full = int(metrics["cssContentSize"]["height"])
    await call(
        "Emulation.setDeviceMetricsOverride",
        width=width, height=max(height, full), deviceScaleFactor=1, mobile=False,
    )  # fmt: skip
    shot = await call("Page.captureScreenshot", format="png")
    seen.png = base64.b64decode(shot["data"])
    return seen


def _note(seen: Rendered, message: dict[str, Any]) -> None:
    """Keep the events that matter: console errors, exceptions, error logs, requests."""
    method, params = message.get("method"), message.get("params", {})
    seen.loaded = seen.loaded or method == "Page.loadEventFired"
    if method == "Runtime.consoleAPICalled" and params.get("type") in {"error", "assert"}:
        seen.console_errors.append(str(params.get("args")))
    elif method == "Runtime.exceptionThrown":
        seen.console_errors.append(str(params.get("exceptionDetails")))
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        seen.console_errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url')}")
    elif method == "Network.requestWillBeSent":
        seen.requests.append(str(params.get("request", {}).get("url")))
