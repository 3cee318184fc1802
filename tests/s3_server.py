"""moto's S3-compatible server (``moto[server]``) run by the tests on loopback, and the
buckets and objects they use on it (through ``batcher.storage.filesystem``, as batcher reads
and writes them)."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from batcher.storage import filesystem
from tests.helpers import free_port

#: The secret access key of the tests' dummy credentials: it must appear nowhere batcher writes.
S3_CANARY = "canary-s3-secret-Zq7xW2"

_buckets = itertools.count()


@contextlib.contextmanager
def moto_server(*, checks_keys: bool = False) -> Iterator[str]:
    """``python -m moto.server`` on a free loopback port until the block ends; its URL.
    ``checks_keys``: every request's key is checked (none is known: all are refused, 403)."""
    port = free_port()
    env = dict(os.environ) | ({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if checks_keys else {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def create_bucket() -> str:
    """A new bucket (the environment points pyarrow at the server); its name."""
    name = f"bucket-{next(_buckets)}-{int(time.time() * 1000) % 10**8}"
    fs, path = filesystem(f"s3://{name}?allow_bucket_creation=true")
    fs.create_dir(path)
    return name


def put(uri: str, data: bytes) -> None:
    """Write ``data`` to the object ``uri``."""
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as out:
        out.write(data)


def get(uri: str) -> bytes:
    """The bytes of the object ``uri``."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return bytes(f.read())


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return bool(fs.get_file_info(path).type == pafs.FileType.File)
