"""Shared fixtures: the anyio backend, each test's own cache folder, an S3-compatible server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _own_price_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test its own price cache (batcher.cost.pricing.PriceCache): none of them reads what
    another looked up, and nothing is written to the user's ~/.cache."""
    monkeypatch.setenv("BATCHER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    # the machine's own endpoint would become every test job's default base URL
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3-compatible server in its own process on loopback (for the whole session);
    its endpoint URL. Skipped where moto's server mode is not installed."""
    pytest.importorskip("moto.server", reason="moto[server] is in the [test] extras")
    from tests.s3_server import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on ``s3_server``, with every AWS client of this test and its
    subprocesses pointed at it (``AWS_ENDPOINT_URL``) with dummy credentials whose secret is
    ``S3_CANARY``; the bucket's name."""
    from tests.s3_server import S3_CANARY, create_bucket

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTBATCHER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CANARY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return create_bucket()
