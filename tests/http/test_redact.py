"""Credentials in a base URL: the URL requests go to keeps them, nothing batcher writes does."""

from __future__ import annotations

import pytest

from batcher.cost.pricing import Pricer
from batcher.errors import ConfigError
from batcher.http.client import chat_completions_url
from batcher.http.redact import redact_url, scheme_only, scrub, url_origin
from batcher.job_file import job_from_dict

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
