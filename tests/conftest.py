"""Shared fixtures: the anyio backend, and a fast job pointed at a given input."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
