"""The ``batcher`` command tunes its own process (``console_main``); ``main`` tunes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import ROOT, write_input

#: A program calling ``main`` (as tests and scripts do), with its own collector settings.
CALLER = textwrap.dedent(
    """
    import gc, json, os, sys

    gc.set_threshold(1234, 11, 12)
    gc.freeze()
    frozen = gc.get_freeze_count()
    environ = dict(os.environ)

    from batcher.cli.main import main

    code = main(sys.argv[1:])
    print(json.dumps({
        "code": code,
        "threshold": list(gc.get_threshold()),
        "frozen": [frozen, gc.get_freeze_count()],
        "environ_changed": sorted(
            k for k in set(environ) | set(os.environ) if environ.get(k) != os.environ.get(k)
        ),
    }))
    """
)


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "BATCHER_CACHE_DIR": str(tmp_path / "cache"),
    }


@pytest.mark.slow  # a calling program in a process of its own
def test_main_called_by_a_program_tunes_nothing(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out.parquet"
    args = ["run", "--input", str(src), "--output", str(out), "--model", "gpt-4o-mini",
            "--base-url", "sim", "--tpm", "1e9", "--no-progress"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", CALLER, *args], env=_env(tmp_path), capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.splitlines()[-1])
    assert found["code"] == 0
    assert found["threshold"] == [1234, 11, 12]
    frozen_before, frozen_after = found["frozen"]
    assert frozen_before - 200 < frozen_after <= frozen_before  # nothing frozen or unfrozen
    assert found["environ_changed"] == []


def test_the_commands_housekeeping_drops_the_tables_python_copy_and_stops_trimming() -> None:
    from batcher.cli.tuning import ProcessTuning
    from batcher.cost.tokens import get_encoding, release_encodings

    release_encodings()
    encoding = get_encoding("cl100k_base")
    counted = encoding.encode_ordinary("Hello, world!")
    assert encoding._mergeable_ranks  # a library's encoding is tiktoken's, whole
    tuning = ProcessTuning()
    tuning.tables_loaded()
    assert encoding._mergeable_ranks == {}  # the command's: the Python copy dropped
    assert encoding.encode_ordinary("Hello, world!") == counted  # counting is unchanged
    tuning.before_output()
    tuning.finish()
    assert tuning._trimmer is not None and not tuning._trimmer.is_alive()
    release_encodings()
