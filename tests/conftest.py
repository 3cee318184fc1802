"""Shared fixtures: the anyio backend, and a fast job pointed at a given input."""

from __future__ import annotations

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
