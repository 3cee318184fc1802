"""``batcher sim`` on the command line: the port it is given, the address it prints."""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest

from tests.helpers import batcher_cmd, run_batcher


@pytest.mark.parametrize("port", ["70000", "65536", "-1"])
def test_a_port_out_of_range_is_a_usage_error(port: str) -> None:
    # 70000 would otherwise bind port 4464 (70000 mod 65536) and serve there
    proc = run_batcher("sim", "--port", port, timeout=30)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "--port" in last and "0..65535" in last, proc.stderr
    assert "Traceback" not in proc.stderr and "serving" not in proc.stderr


@pytest.mark.parametrize("host", ["999.1.1.1", "192.0.2.1"])
def test_a_host_that_cannot_be_listened_on_is_named_not_the_port(host: str) -> None:
    # 999.1.1.1 does not resolve; 192.0.2.1 (a documentation address) is not this machine's
    proc = run_batcher("sim", "--host", host, "--port", "0", timeout=30)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"batcher: error: --host: cannot listen on {host}:0"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_port_zero_prints_the_port_it_got() -> None:
    proc = subprocess.Popen(
        batcher_cmd("sim", "--port", "0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"serving (http://127\.0\.0\.1:(\d+)/v1)", line)
        assert found is not None and found.group(2) != "0", line
        # the printed address is the one that answers
        stats = httpx.get(found.group(1).removesuffix("/v1") + "/stats", timeout=10)
        assert stats.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
