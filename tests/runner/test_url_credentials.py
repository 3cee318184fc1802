"""Credentials in the base URL: sent as the request's Authorization when nothing else claims
that header; beside an API key (or an Authorization header) a usage error before anything is
sent, instead of an error record for every line."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from tests.helpers import run_batcher, write_input
from tests.loopback import chat_answer, read_body, serving


class _Recorder:
    """An ASGI app that answers every POST and keeps each request's Authorization header."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        headers = dict(scope["headers"])
        value = headers.get(b"authorization")
        self.authorizations.append(None if value is None else value.decode())
        raw = json.dumps(chat_answer("m", {"prompt_tokens": 1, "completion_tokens": 1})).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": raw})


def _with_credentials(url: str) -> str:
    return url.replace("http://", "http://alice:s3cret-pw@", 1)


def _run_with_credentials(
    tmp_path: Path, app: _Recorder, lines: int, env: dict[str, str] | None = None
) -> tuple[Any, Path]:
    """``batcher run`` of ``lines`` lines against ``app`` through a base URL with credentials;
    the finished process and the output path."""
    src = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.parquet"
    with serving(app) as url:
        proc = run_batcher(
            "run", "--input", str(src), "--output", str(out), "--model", "m",
            "--base-url", _with_credentials(url), "--no-progress", env=env,
        )  # fmt: skip
    return proc, out


def test_url_credentials_beside_an_api_key_stop_before_sending(tmp_path: Path) -> None:
    app = _Recorder()
    proc, out = _run_with_credentials(tmp_path, app, 3, {"OPENAI_API_KEY": "sk-test-url-creds"})
    assert proc.returncode == 2, proc.stderr
    assert "endpoint.base_url" in proc.stderr
    assert "Authorization" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "s3cret-pw" not in proc.stderr + proc.stdout
    assert "sk-test-url-creds" not in proc.stderr + proc.stdout
    assert app.authorizations == []  # nothing sent
    assert not out.exists()


def test_url_credentials_beside_an_authorization_header_stop_before_sending(
    tmp_path: Path,
) -> None:
    app = _Recorder()
    src = write_input(tmp_path / "in.jsonl", 2)
    with serving(app) as url:
        job = tmp_path / "job.toml"
        job.write_text(
            f'[job]\ninput = "{src}"\noutput = "{tmp_path / "out.parquet"}"\n'
            f'[endpoint]\nbase_url = "{_with_credentials(url)}"\n'
            '[endpoint.headers]\nAuthorization = "Token abc"\n'
            '[request]\nmodel = "m"\n'
        )
        proc = run_batcher("run", str(job), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "endpoint.base_url" in proc.stderr
    assert app.authorizations == []


def test_url_credentials_alone_are_sent_as_basic_authorization(tmp_path: Path) -> None:
    app = _Recorder()
    proc, _ = _run_with_credentials(tmp_path, app, 2)
    assert proc.returncode == 0, proc.stderr
    expected = "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()
    assert app.authorizations == [expected, expected]


def test_an_authorization_header_beside_an_api_key_stops_before_sending(tmp_path: Path) -> None:
    """Both were sent (two Authorization headers, the server picking one); the header alone
    is sent as it is."""
    app = _Recorder()
    src = write_input(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out.parquet"
    with serving(app) as url:
        job = tmp_path / "job.toml"
        job.write_text(
            f'[job]\ninput = "{src}"\noutput = "{out}"\n[endpoint]\nbase_url = "{url}"\n'
            '[endpoint.headers]\nAuthorization = "Token abc-header"\n[request]\nmodel = "m"\n'
        )
        both = run_batcher("run", str(job), "--no-progress", env={"OPENAI_API_KEY": "sk-env-9"})
        assert both.returncode == 2, both.stderr
        assert "endpoint.headers: an Authorization header is set and $OPENAI_API_KEY" in both.stderr
        assert "sk-env-9" not in both.stderr and "abc-header" not in both.stderr
        assert app.authorizations == [] and not out.exists()
        alone = run_batcher("run", str(job), "--no-progress")
    assert alone.returncode == 0, alone.stderr
    assert app.authorizations == ["Token abc-header", "Token abc-header"]
