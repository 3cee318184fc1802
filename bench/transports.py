"""Compare HTTP clients side by side: N chat completions at C in flight against the simulator.

    python bench/transports.py                        # N=5000, 256 in flight, 200 ms, once
    python bench/transports.py --repeat 3 --n-for httpx-default=2000
    python bench/transports.py --only aiohttp,batcher --n 20000

The ``aiohttp``, ``httpx-default`` and ``openai`` children are also ``bench/run.py``'s raw
aiohttp, raw httpx and openai SDK peers (there measured as whole processes).

One simulator (``python -m batcher sim``) serves every client; each client runs in a fresh
child process of this same script (``--child``), so its CPU time and peak RSS are its own. The
child times only the request phase (client creation, N requests, close): interpreter start-up
and imports are left out. Every client does the same work per request: serialise the body to
JSON, POST it, read the whole answer and parse its JSON. Workers pull from one shared queue of
bodies, ``C`` workers for ``C`` requests in flight, and the pool allows ``C`` connections.

Exits 1 if any request failed, if the simulator did not count exactly N requests for a client,
or if a child crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # bench/ is on sys.path (above), so this runs as a plain script
    HEADERS,
    Measure,
    SimProcess,
    add_measuring_flags,
    add_selection_flags,
    check_sim_count,
    child_problems,
    environment_note,
    format_table,
    ideal_s,
    installed,
    log_run,
    measure_quietly,
    read_bodies,
    run_against_sim,
    running_sim,
    scratch_dir,
    selected,
    summary_row,
    write_jsonl,
)

Post = Callable[[dict[str, Any]], Awaitable[bool]]
_JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
_SHARDS = 8


@dataclass(frozen=True)
class ClientSpec:
    """One client under test: its name, what it is, and the import it needs."""

    name: str
    description: str
    requires: str = ""
    uvloop: bool = False


CLIENTS: tuple[ClientSpec, ...] = (
    ClientSpec("aiohttp", "raw aiohttp.ClientSession, TCPConnector(limit=C) (baseline)"),
    ClientSpec(
        "aiohttp-durable",
        "raw aiohttp plus the least of batcher's promises: each answer parsed (orjson), one "
        "journal line written (os.write) and a Parquet row (zstd, 5,000-row groups) for it",
    ),
    ClientSpec("httpx-default", "httpx.AsyncClient, its own pool: Limits(max_connections=C)"),
    ClientSpec(
        "httpx-aiohttp",
        "httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport(limits=C))",
        "httpx_aiohttp",
    ),
    ClientSpec(
        "batcher",
        "batcher.http.client.ChatClient(max_connections=C), the default transport "
        "(batcher.http.h1: keep-alive HTTP/1.1 on asyncio protocols and httptools)",
    ),
    ClientSpec("batcher-aiohttp", "batcher's ChatClient(http='aiohttp'): AiohttpTransport"),
    ClientSpec(
        "httpx-sharded",
        f"{_SHARDS} httpx.AsyncClient pools of C/{_SHARDS} connections, worker i uses pool i % "
        f"{_SHARDS}",
    ),
    ClientSpec(
        "httpx-curl-cffi",
        "httpx.AsyncClient(transport=httpx_curl_cffi.AsyncCurlTransport(max_connections=C))",
        "httpx_curl_cffi",
    ),
    ClientSpec("batcher-uvloop", "batcher's ChatClient on a uvloop event loop", "uvloop", True),
    ClientSpec(
        "pyreqwest",
        "raw pyreqwest (Rust reqwest/hyper on a tokio thread): ClientBuilder().max_connections(C)",
        "pyreqwest",
    ),
    ClientSpec(
        "batcher-pyreqwest",
        "batcher's ChatClient(http='pyreqwest'): batcher.http.native.ReqwestTransport",
        "pyreqwest",
    ),
    ClientSpec(
        "rnet",
        "raw rnet (Rust wreq/hyper on a tokio runtime): rnet.Client(pool_max_size=C)",
        "rnet",
    ),
    ClientSpec(
        "openai",
        "openai.AsyncOpenAI(base_url=SIM), the SDK's defaults (its own httpx2 pool, "
        "max_retries=2); chat.completions.create(**body)",
        "openai",
    ),
)
_BY_NAME = {spec.name: spec for spec in CLIENTS}


# -- the child: one client, one measured run -----------------------------------------------------


def _ok_answer(status: int, raw: bytes) -> bool:
    if status != 200:
        return False
    body = json.loads(raw)
    return isinstance(body, dict) and isinstance(body.get("choices"), list)


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


async def _open_client(
    name: str, base_url: str, concurrency: int, stack: AsyncExitStack
) -> Callable[[int], Post]:
    """Build client ``name``; return ``worker index -> post function``. ``stack`` closes it."""
    url = base_url.rstrip("/") + "/chat/completions"
    if name == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))

        async def post_aiohttp(body: dict[str, Any]) -> bool:
            async with session.post(url, data=_encode(body), headers=_JSON_HEADERS) as response:
                return _ok_answer(response.status, await response.read())

        return lambda _worker: post_aiohttp

    if name == "aiohttp-durable":
        return await _durable_aiohttp(url, concurrency, stack)

    if name == "pyreqwest":
        from pyreqwest.client import ClientBuilder

        builder = ClientBuilder().max_connections(concurrency).follow_redirects(False)
        native = await stack.enter_async_context(builder.build())

        async def post_pyreqwest(body: dict[str, Any]) -> bool:
            request = native.post(url).body_bytes(_encode(body)).headers(_JSON_HEADERS).build()
            response = await request.send()  # the whole body is read before this returns
            return _ok_answer(response.status, (await response.bytes()).to_bytes())

        return lambda _worker: post_pyreqwest

    if name == "rnet":
        import rnet

        rnet_client = rnet.Client(pool_max_size=concurrency, allow_redirects=False)

        async def post_rnet(body: dict[str, Any]) -> bool:
            response = await rnet_client.post(url, body=_encode(body), headers=_JSON_HEADERS)
            return _ok_answer(response.status, await response.bytes())

        return lambda _worker: post_rnet

    if name == "openai":
        import openai

        # The SDK as a user would hold it: its own HTTP client and pool, default timeout and
        # max_retries=2. A retry would show in the simulator's count (more than N received),
        # which fails the benchmark, so the defaults cannot hide a lost request.
        sdk = await stack.enter_async_context(
            openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench")
        )

        async def post_openai(body: dict[str, Any]) -> bool:
            completion = await sdk.chat.completions.create(**body)  # parsed into a model
            return isinstance(completion.choices, list)

        return lambda _worker: post_openai

    if name in ("batcher", "batcher-aiohttp", "batcher-uvloop", "batcher-pyreqwest"):
        from batcher.http.client import ChatClient, HttpLibrary

        http: HttpLibrary | None = None
        if name in ("batcher-aiohttp", "batcher-pyreqwest"):
            http = "pyreqwest" if name == "batcher-pyreqwest" else "aiohttp"
        chat = await stack.enter_async_context(
            ChatClient(base_url, api_key=None, max_connections=concurrency, http=http)
        )

        async def post_batcher(body: dict[str, Any]) -> bool:
            return (await chat.post(body)).ok

        return lambda _worker: post_batcher

    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(600.0)
    clients: list[httpx.AsyncClient]
    if name == "httpx-default":
        clients = [httpx.AsyncClient(limits=limits, timeout=timeout)]
    elif name == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport(limits=limits)
        clients = [httpx.AsyncClient(transport=transport, timeout=timeout)]
    elif name == "httpx-curl-cffi":
        from httpx_curl_cffi import AsyncCurlTransport

        curl = AsyncCurlTransport(max_connections=concurrency)
        clients = [httpx.AsyncClient(transport=curl, timeout=timeout)]
    elif name == "httpx-sharded":
        per_shard = max(1, concurrency // _SHARDS)
        shard_limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        clients = [httpx.AsyncClient(limits=shard_limits, timeout=timeout) for _ in range(_SHARDS)]
    else:
        raise SystemExit(f"unknown client {name!r}")
    for each in clients:
        await stack.enter_async_context(each)

    def post_for(worker: int) -> Post:
        client = clients[worker % len(clients)]

        async def post_httpx(body: dict[str, Any]) -> bool:
            response = await client.post(url, content=_encode(body), headers=_JSON_HEADERS)
            return _ok_answer(response.status_code, response.content)

        return post_httpx

    return post_for


async def _durable_aiohttp(
    url: str, concurrency: int, stack: AsyncExitStack
) -> Callable[[int], Post]:
    """Raw aiohttp doing the least of what batcher promises for each answer: its JSON parsed,
    a journal line written through to the kernel before the next answer (a ``kill -9`` loses
    only the requests in flight), and its row in a Parquet file written as the run goes. The
    floor of a client with batcher's promises in Python; batcher's engine, limits, retries and
    checks are what it adds above this."""
    import os
    import tempfile

    import aiohttp
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="durable-"))
    fd = os.open(os.path.join(folder, "journal"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    stack.callback(os.close, fd)
    schema = pa.schema([("custom_id", pa.string()), ("status", pa.string()),
                        ("content", pa.string()), ("prompt_tokens", pa.int64()),
                        ("completion_tokens", pa.int64()), ("response", pa.string())])  # fmt: skip
    writer = pq.ParquetWriter(os.path.join(folder, "out.parquet"), schema, compression="zstd")
    rows: list[tuple[Any, ...]] = []

    def flush() -> None:
        columns = zip(*rows, strict=True)
        arrays = [pa.array(list(c), type=f.type) for c, f in zip(columns, schema, strict=True)]
        writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        rows.clear()

    def close() -> None:
        if rows:
            flush()
        writer.close()

    stack.callback(close)
    connector = aiohttp.TCPConnector(limit=concurrency)
    session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
    sent = iter(range(1 << 62))

    async def post_durable(body: dict[str, Any]) -> bool:
        custom_id = f"req-{next(sent)}"
        async with session.post(url, data=orjson.dumps(body), headers=_JSON_HEADERS) as response:
            status, raw = response.status, await response.read()
        answer = orjson.loads(raw)
        good = (
            status == 200 and isinstance(answer, dict) and isinstance(answer.get("choices"), list)
        )
        record = {"custom_id": custom_id, "status": "ok" if good else "error", "body": answer}
        os.write(fd, orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        usage = answer.get("usage") or {}
        content = answer["choices"][0]["message"]["content"] if good else None
        rows.append((custom_id, record["status"], content, usage.get("prompt_tokens"),
                     usage.get("completion_tokens"), raw.decode()))  # fmt: skip
        if len(rows) >= 5000:
            flush()
        return good

    return lambda _worker: post_durable


async def _drive(
    name: str, base_url: str, bodies: list[dict[str, Any]], concurrency: int
) -> dict[str, Any]:
    """Send every body through client ``name`` with ``concurrency`` workers; count outcomes."""
    ok = failed = 0
    errors: list[str] = []
    queue: Iterator[dict[str, Any]] = iter(bodies)

    async def worker(post: Post) -> None:
        nonlocal ok, failed
        for body in queue:  # one shared iterator: each body is taken by exactly one worker
            try:
                good = await post(body)
            except Exception as exc:
                good = False
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}")
            if good:
                ok += 1
            else:
                failed += 1

    async with AsyncExitStack() as stack:
        post_for = await _open_client(name, base_url, concurrency, stack)
        await asyncio.gather(*(worker(post_for(i)) for i in range(concurrency)))
    return {"ok": ok, "failed": failed, "errors": errors}


#: What each client imports when it is built: imported before the clock starts, so that the
#: request phase holds no import (aiohttp's takes ~0.2 s here: it builds TLS contexts).
_IMPORTS = {
    "aiohttp": ("aiohttp",),
    "aiohttp-durable": ("aiohttp", "orjson", "pyarrow.parquet"),
    "openai": ("openai",),
    "batcher": ("batcher.http.client",),
    "batcher-aiohttp": ("batcher.http.client", "aiohttp"),
    "batcher-uvloop": ("batcher.http.client",),
    "httpx-aiohttp": ("httpx", "httpx_aiohttp"),
    "httpx-curl-cffi": ("httpx", "httpx_curl_cffi"),
    "pyreqwest": ("pyreqwest.client",),
    "batcher-pyreqwest": ("batcher.http.client", "batcher.http.native", "pyreqwest.client"),
    "rnet": ("rnet",),
}


def child_main(name: str, base_url: str, input_path: Path, concurrency: int) -> int:
    """Run one client once and print its figures as one JSON line on stdout."""
    spec = _BY_NAME[name]
    for module in _IMPORTS.get(name, ("httpx",)):
        importlib.import_module(module)
    bodies = read_bodies(input_path)
    loop_factory = None
    if spec.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        outcome = runner.run(_drive(name, base_url, bodies, concurrency))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    outcome.update(wall_s=wall, cpu_s=cpu, maxrss_mb=after.ru_maxrss / 1024, n=len(bodies))
    if name == "pyreqwest":
        # pyreqwest's runtime thread finishes closing its pool just after close() returns; an
        # interpreter that exits meanwhile aborts (batcher.http.native.ReqwestTransport waits
        # in aclose, inside its timed run). Waited here, after the clock.
        time.sleep(0.05)
    print(json.dumps(outcome))
    return 0


# -- the parent: the simulator, the children, the table ------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``bench/transports.py``."""
    parser = argparse.ArgumentParser(
        description="Compare HTTP clients against the batcher simulator.",
        epilog="clients: " + "; ".join(f"{s.name}: {s.description}" for s in CLIENTS),
    )
    parser.add_argument("--n", type=int, default=5000, help="requests per client (5000)")
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight (256)")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="simulator latency (200)")
    add_selection_flags(parser, list(_BY_NAME), what="client", slow="httpx-default")
    add_measuring_flags(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    return parser


def _selected(args: argparse.Namespace) -> list[ClientSpec]:
    chosen = []
    for name in selected(args, list(_BY_NAME)):
        spec = _BY_NAME[name]
        if spec.requires and not installed(spec.requires):
            print(f"skipping {name}: {spec.requires} is not installed", file=sys.stderr)
            continue
        chosen.append(spec)
    return chosen


def _run_one(
    spec: ClientSpec, n: int, input_path: Path, args: argparse.Namespace, sim: SimProcess
) -> tuple[Measure | None, list[str]]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", spec.name,
        "--base-url", sim.base_url, "--input", str(input_path),
        "--concurrency", str(args.concurrency),
    ]  # fmt: skip
    observed = run_against_sim(cmd, sim, pin=args.pin)
    child = observed.child
    problems = child_problems(spec.name, child, n, outcome=True)
    if child.returncode != 0:
        return None, problems
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    problems += check_sim_count(sim, n, spec.name)
    measure = Measure(
        name=spec.name,
        n=n,
        wall_s=figures["wall_s"],
        cpu_s=figures["cpu_s"],
        maxrss_mb=figures["maxrss_mb"],
        sim_cpu_s=observed.sim_cpu_s,
        other_pct=observed.other_pct,
        ok=figures["ok"],
        failed=figures["failed"],
    )
    return measure, problems


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the parent run, or (``--child``) one client's measured run."""
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args.child, args.base_url, args.input, args.concurrency)

    if args.n < 1 or args.concurrency < 1 or args.repeat < 1 or args.latency_ms < 0:
        raise SystemExit("--n, --concurrency and --repeat must be >= 1, --latency-ms >= 0")
    specs = _selected(args)
    n_for = dict(args.n_for)
    sizes = {spec.name: n_for.get(spec.name, args.n) for spec in specs}
    results: dict[str, list[Measure]] = {spec.name: [] for spec in specs}
    problems: list[str] = []
    print(f"# {environment_note()}", file=sys.stderr)
    with scratch_dir() as tmp, running_sim(args.latency_ms, pin=args.pin) as sim:
        inputs = {n: write_jsonl(tmp / f"input-{n}.jsonl", n) for n in set(sizes.values())}
        for round_no in range(1, args.repeat + 1):
            for spec in specs:
                n = sizes[spec.name]
                measure, found = measure_quietly(
                    functools.partial(_run_one, spec, n, inputs[n], args, sim),
                    label=spec.name,
                    max_other=args.max_other,
                    retries=args.busy_retries,
                )
                problems += found
                if measure is not None:
                    results[spec.name].append(measure)
                    log_run(round_no, args.repeat, measure)
    _report(args, specs, results, problems)
    if args.json:
        raw = {name: [vars(m) for m in runs] for name, runs in results.items()}
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 1 if problems else 0


def _report(
    args: argparse.Namespace,
    specs: Iterable[ClientSpec],
    results: dict[str, list[Measure]],
    problems: list[str],
) -> None:
    rows = []
    for spec in specs:
        runs = results[spec.name]
        if runs:
            rows.append(summary_row(runs, ideal_s(runs[0].n, args.latency_ms, args.concurrency)))
    print(
        f"\n{args.concurrency} in flight, simulator latency {args.latency_ms:g} ms, "
        f"median of {args.repeat} run(s), pinned={'yes' if args.pin else 'no'}; "
        f"ideal = N × latency / concurrency\n"
    )
    if rows:
        print(format_table(HEADERS, rows))
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
