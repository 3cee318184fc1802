"""The public surface of ``batcher`` is small and every name in it resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest

import batcher


def test_all_is_small_sorted_and_resolves() -> None:
    assert batcher.__all__ == sorted(batcher.__all__)
    assert len(batcher.__all__) <= 12
    for name in batcher.__all__:
        assert getattr(batcher, name) is not None


def test_all_is_exactly_the_documented_surface() -> None:
    assert set(batcher.__all__) == {
        "BatcherError", "ConfigError", "InputError", "OutputError",  # the error tree
        "JobConfig", "load_job", "with_overrides",  # building a job
        "run", "arun", "RunResult", "RunReport",  # running it, from a script or a notebook
        "__version__",
    }  # fmt: skip
    # the lower-level calls run() is built on still resolve, outside __all__
    assert batcher.run_job.__module__ == "batcher.runner.run"
    assert batcher.job_from_dict.__module__ == "batcher.job_file"


@pytest.mark.slow
def test_importing_batcher_does_not_import_the_runner() -> None:
    code = "import sys, batcher; print('batcher.runner.run' in sys.modules, 'anyio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="nope"):
        batcher.nope  # noqa: B018


@pytest.mark.slow
def test_cli_help_does_not_import_pyarrow_or_httpx() -> None:
    code = "import sys, batcher.cli.main; print('pyarrow' in sys.modules, 'httpx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
