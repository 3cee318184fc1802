"""Credentials in a base URL: the URL requests go to keeps them, nothing batcher writes does."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from batcher.cost.pricing import Pricer
from batcher.errors import ConfigError
from batcher.http.client import chat_completions_url
from batcher.http.redact import (
    client_secrets,
    redact_url,
    scheme_only,
    scrub,
    scrub_json,
    url_origin,
)
from batcher.job_file import job_from_dict
from tests.helpers import run_batcher, write_job
from tests.loopback import chat_answer, json_app, serving

SECRET = "s3cr3t-k9-not-a-real-key"


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("https://h/v1", "https://h/v1/chat/completions"),
        ("https://h/v1/", "https://h/v1/chat/completions"),
        (
            "https://h/openai/deployments/x?api-version=2024-06-01",
            "https://h/openai/deployments/x/chat/completions?api-version=2024-06-01",
        ),
        ("https://h/v1/?api-key=k&a=b#frag", "https://h/v1/chat/completions?api-key=k&a=b"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/chat/completions"),
    ],
)
def test_the_path_is_appended_before_the_query(base: str, url: str) -> None:
    assert chat_completions_url(base) == url


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://h/v1", "https://h/v1"),
        ("sim", "sim"),
        (
            f"https://h/x?api-version=2024-06-01&api-key={SECRET}",
            "https://h/x?api-version=2024-06-01&api-key=***",
        ),
        (f"https://user:{SECRET}@h:8443/v1", "https://***@h:8443/v1"),
        (f"https://h/v1?sig={SECRET}&code={SECRET}#{SECRET}", "https://h/v1?sig=***&code=***"),
        (f"https://h/v1?{SECRET}", "https://h/v1?***"),
        (f"api.example.com/v1?token={SECRET}", "api.example.com/v1?token=***"),
        (f"ftp://u:{SECRET}@h/v1", "ftp://***@h/v1"),
    ],
)
def test_every_credential_is_redacted_from_a_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_a_message_quoting_the_url_in_any_spelling_is_scrubbed() -> None:
    url = f"https://h/v1?api-key={SECRET}%2Fx&api-version=1"
    message = f"error at url='https://h/v1/chat/completions?api-key={SECRET}/x' ({SECRET}%2Fx)"
    scrubbed = scrub(message, url)
    assert SECRET not in scrubbed and "https://h/v1/chat/completions?api-key=***" in scrubbed


def test_the_origin_of_a_redirect_has_no_credentials() -> None:
    assert url_origin(f"http://u:{SECRET}@evil.test:9/x?k={SECRET}") == "http://evil.test:9"
    assert url_origin("/v2/chat/completions") is None


def test_a_bad_base_url_is_named_without_its_key() -> None:
    with pytest.raises(ConfigError) as caught:
        job_from_dict({"endpoint": {"base_url": f"ftp://h/v1?api-key={SECRET}"}})
    assert caught.value.field == "endpoint.base_url" and SECRET not in str(caught.value)


def test_a_pricer_keeps_no_credentials_of_its_endpoint() -> None:
    pricer = Pricer(provider_api_url=f"https://h/v1?api-key={SECRET}")
    assert SECRET not in repr(vars(pricer))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("slack://T0AAA/B0BBB/xoxtoken", "slack://***"),
        ("json://user:pw@hooks.example.com/x?token=1", "json://***"),
        ("not a url with a secret", "***"),
        ("://secret", "***"),
    ],
)
def test_scheme_only_keeps_nothing_but_the_scheme(url: str, shown: str) -> None:
    assert scheme_only(url) == shown


def test_a_server_quoting_the_key_leaves_it_in_no_output_log_or_status(tmp_path: Path) -> None:
    """A gateway whose 401/400 body names the key it was sent (or a custom header's token):
    the error records, the summary, the journal, the status file and the output hold ***."""
    key, token = "sk-QUOTED-KEY-0123456789", "tok-QUOTED-HEADER-42"

    async def quoting(body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if body["messages"][0]["content"] == "bad":
            said = f"Incorrect API key provided: {key} (and X-Auth-Token {token})"
            return 400, {"error": {"message": said, "code": "invalid_api_key", key: token}}, {}
        return 200, chat_answer(body["model"], {"prompt_tokens": 1, "completion_tokens": 1}), {}

    (tmp_path / "in.jsonl").write_text('{"prompt": "bad"}\n{"prompt": "fine"}\n')
    for output in ("out.jsonl", "out.parquet"):
        with serving(json_app(quoting)) as url:
            job = write_job(
                tmp_path / "job.toml",
                f'[job]\ninput = "in.jsonl"\noutput = "{output}"\n'
                f'[endpoint]\nbase_url = "{url}"\nheaders = {{ "X-Auth-Token" = "{token}" }}\n'
                '[request]\nmodel = "m"\n[pricing.m]\ninput = 1\noutput = 1\n',
            )
            keep_going = run_batcher("run", str(job), "--no-progress", env={"OPENAI_API_KEY": key})
        assert keep_going.returncode == 1, keep_going.stderr
        assert "invalid_api_key" in keep_going.stderr
        files = [p for p in tmp_path.iterdir() if p.is_file() and p.name != "job.toml"]
        written = b"".join(p.read_bytes() for p in files)
        assert b"Incorrect API key provided: ***" in written or output.endswith("parquet")
        for text in (keep_going.stdout + keep_going.stderr, written.decode("utf-8", "replace")):
            assert key not in text and token not in text
        shown = run_batcher("status", str(tmp_path / output))
        assert "Incorrect API key provided: ***" in shown.stdout, shown.stdout
        assert key not in shown.stdout and token not in shown.stdout


@pytest.mark.parametrize(
    ("headers", "quoted"),
    [
        ({"Authorization": "Basic dXNlcjpzZWNyZXQtcGFzcw=="}, "dXNlcjpzZWNyZXQtcGFzcw=="),
        ({"Authorization": "bearer lower-case-bearer-token"}, "lower-case-bearer-token"),
        ({"Authorization": "Token tok-0123456789"}, "tok-0123456789"),
        ({"Cookie": "session=cookie-secret-123"}, "session=cookie-secret-123"),
        ({"X-Password": "hunter2-but-long"}, "hunter2-but-long"),
    ],
)
def test_a_credential_in_any_header_is_a_secret_whole_and_without_its_scheme(
    headers: dict[str, str], quoted: str
) -> None:
    secrets = client_secrets("http://h/v1", None, headers)
    assert scrub_json(f"bad token {quoted}", secrets) == "bad token ***"


def test_url_credentials_are_secrets_as_the_basic_authorization_they_are_sent_as() -> None:
    # what aiohttp, httpx and pyreqwest send for http://user:s%C3%A9cret-pass@h/v1
    secrets = client_secrets("http://user:s%C3%A9cret-pass@h/v1", None, None)
    for encoding in ("utf-8", "latin-1"):
        token = base64.b64encode("user:s\u00e9cret-pass".encode(encoding)).decode()
        assert scrub_json(f"Basic {token} refused", secrets) == "Basic *** refused"


def test_placeholders_and_harmless_headers_are_not_scrubbed_from_messages() -> None:
    # ``OPENAI_API_KEY=EMPTY`` (vLLM's placeholder) must not blank out "EMPTY" everywhere
    secrets = client_secrets("http://h/v1", "EMPTY", {"Content-Type": "application/json"})
    assert scrub_json("messages: EMPTY list; application/json expected", secrets) == (
        "messages: EMPTY list; application/json expected"
    )


def test_scrub_json_replaces_secrets_in_keys_values_and_lists() -> None:
    value = {"a": [f"x{SECRET}y", 3, None], SECRET: {"b": SECRET}}
    assert scrub_json(value, [SECRET]) == {"a": ["x***y", 3, None], "***": {"b": "***"}}
