"""A program that uses batcher as a library keeps its process as it set it up."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import write_input

ROOT = Path(__file__).resolve().parent.parent

#: A host program: its own collector settings, a frozen heap, then two overlapping runs on the
#: built-in simulator, one of them with a TPM limit (so the token tables load), then what is
#: left of what it set up.
HOST = textwrap.dedent(
    """
    import asyncio, gc, importlib.util, json, os, sys

    gc.set_threshold(1234, 11, 12)
    kept = [[i] for i in range(20_000)]  # the host's long-lived objects
    gc.freeze()
    frozen = gc.get_freeze_count()
    environ = dict(os.environ)
    meta_path = list(sys.meta_path)

    import batcher

    def job(name, limits):
        return {
            "job": {"input": f"{name}.jsonl", "output": f"{name}.parquet"},
            "endpoint": {"base_url": "sim"},
            "request": {"model": "gpt-4o-mini", "max_tokens": 16},
            "limits": limits,
            "sim": {"latency_ms": 20},
        }

    async def both():
        return await asyncio.gather(
            batcher.arun(job("a", {"concurrency": 4, "tpm": 10_000_000})),
            batcher.arun(job("b", {"concurrency": 4})),
        )

    results = asyncio.run(both())
    # the host's own objects are still frozen: out of the collector's sight
    seen = {id(o) for o in gc.get_objects()}
    still_frozen = not any(id(k) in seen for k in kept)
    numpy = None
    if importlib.util.find_spec("numpy") is not None:
        import numpy

        numpy = numpy.__name__
    print(json.dumps({
        "ok": [r.report.stats.ok for r in results],
        "counted": [
            sum(1 for t in r.table.column("prompt_tokens").to_pylist() if t) for r in results
        ],
        "threshold": list(gc.get_threshold()),
        "frozen": [frozen, gc.get_freeze_count()],
        "still_frozen": still_frozen,
        "environ_changed": sorted(
            k for k in set(environ) | set(os.environ) if environ.get(k) != os.environ.get(k)
        ),
        # the host's finders all there, in order; a new one only from a dependency's import
        # (pandas' dateutil imports six, which adds its own)
        "meta_path_kept": [f for f in sys.meta_path if f in meta_path] == meta_path,
        "finders_added_by": sorted(
            type(f).__module__ for f in sys.meta_path if f not in meta_path
        ),
        "numpy": numpy,
        "numpy_installed": importlib.util.find_spec("numpy") is not None,
    }))
    """
)


@pytest.mark.slow  # a host program in a process of its own
def test_two_overlapping_library_runs_leave_the_hosts_process_as_it_was(tmp_path: Path) -> None:
    write_input(tmp_path / "a.jsonl", 12)
    write_input(tmp_path / "b.jsonl", 12)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "BATCHER_CACHE_DIR": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", HOST], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["ok"] == [12, 12]
    assert found["counted"][0] == 12  # the TPM-limited run counted its prompts: tokens loaded
    assert found["threshold"] == [1234, 11, 12]
    # nothing unfrozen (the host's objects still out of sight) and nothing more frozen (a
    # frozen object that dies leaves the count: a few do, among the imports' leftovers)
    assert found["still_frozen"]
    frozen_before, frozen_after = found["frozen"]
    assert frozen_before > 20_000 and frozen_before - 200 < frozen_after <= frozen_before
    assert found["environ_changed"] == []
    assert found["meta_path_kept"]
    assert not [m for m in found["finders_added_by"] if m.startswith("batcher")]
    assert found["numpy"] == ("numpy" if found["numpy_installed"] else None)
