"""Ray for one run on the driver: connecting (or starting a local instance), the dataset (a
read task feeding the actor pool), and what a failed worker said."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from batcher.errors import OutputError
from batcher.ray.reading import ReadPlan, read_blocks
from batcher.ray.stopping import StopFlag
from batcher.ray.worker import ERROR_MARK, BlockWorker, WorkerSpec

if TYPE_CHECKING:
    import pyarrow as pa

#: Blocks each actor runs at once (they share its limits and connection pool).
CALLS_PER_WORKER = 2


class RaySession:
    """Ray for one run: connected on first use, shut down after if this run started it."""

    def __init__(self, on_connect: Callable[[], None]) -> None:
        self._started = False
        self._on_connect = on_connect

    def _ray(self) -> Any:
        import ray

        if not ray.is_initialized():
            self._started = True
            _init_ray(ray)
            self._on_connect()
        return ray

    def put(self, value: Any) -> Any:
        """``value`` in the object store; its reference."""
        return self._ray().put(value)

    def stop_flag(self) -> Any:
        """A new ``StopFlag`` actor (no CPU: the workers may take them all)."""
        return self._ray().remote(num_cpus=0)(StopFlag).remote()

    def cpus(self) -> int:
        """The cluster's CPUs (at least one)."""
        return max(1, int(self._ray().cluster_resources().get("CPU", 1)))

    def run(self, plan: ReadPlan, spec: WorkerSpec) -> Iterator[pa.Table]:
        """The finished blocks, as they come: one read task streams the input's blocks
        (``reading.read_blocks``) to the actor pool."""
        ray = self._ray()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # batcher's own progress says how far the run is
        ctx.print_on_execution_start = False
        pool = ray.data.ActorPoolStrategy(
            size=spec.workers,
            max_concurrent_calls_per_actor=CALLS_PER_WORKER,
            enable_true_multi_threading=True,
        )
        _quiet_ray_data()
        # The spec travels with the class rather than as a constructor argument: Ray keeps
        # constructor arguments in the object store and warns that a restarted actor could
        # lose them.
        worker = type("BlockWorker", (BlockWorker,), {"spec": spec})
        # Every row is a whole block (``reading.pack``): with a one-byte target each row is
        # its own Ray Data block, sent on as soon as it is made, never merged nor cut.
        saved, ctx.target_max_block_size = ctx.target_max_block_size, 1
        try:
            dataset = (
                ray.data.from_items([{"read": 0}])
                .map_batches(
                    read_blocks,
                    fn_kwargs={"plan": plan},
                    batch_size=None,
                    batch_format="pyarrow",
                    num_cpus=0,  # the actor pool may take every CPU; reading is light
                )
                .map_batches(
                    worker,
                    batch_size=None,  # a block as the read task made it
                    batch_format="pyarrow",
                    compute=pool,
                    num_cpus=1,
                )
            )
            yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
        except ray.exceptions.RayError as exc:
            raise OutputError(f"the Ray job failed: {first_line(exc)}") from None
        finally:
            ctx.target_max_block_size = saved

    def close(self) -> None:
        """Shut Ray down if this run started it."""
        if self._started:
            import ray

            ray.shutdown()


def _quiet_ray_data() -> None:
    """Ray Data's console logs (execution plans, timings) only from errors on: batcher shows
    progress and failures itself. Its log files in the Ray session folder keep everything.

    Its warning that the actor pool got fewer inputs than actors is silenced too: the blocks
    come from one read task, which Ray Data counts as one input however many blocks it makes.
    """
    import logging
    import warnings

    warnings.filterwarnings(
        "ignore", message="The minimum number of concurrent actors", category=UserWarning
    )

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(logging.ERROR)


def _init_ray(ray: Any) -> None:
    """Connect to the cluster ``RAY_ADDRESS`` names (``ray job submit`` sets it), else start a
    local instance for this run; never join some other instance found on the machine by
    chance.

    Ray's own console messages from errors on only; workers' stderr (batcher's notes: an
    endpoint down, a refused key) is still forwarded.
    """
    import logging

    quiet = {"logging_level": logging.ERROR, "log_to_driver": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        ray.init(address="local", include_dashboard=False, **quiet)


def first_line(exc: BaseException) -> str:
    """What went wrong in a worker, without Ray's wrapping and traceback text: the message a
    worker raised on purpose (``ERROR_MARK``), else the last line of the root cause."""
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or getattr(cause, "cause", None)
    for error in seen:
        for line in str(error).splitlines():
            if ERROR_MARK in line:
                return line[line.index(ERROR_MARK) + len(ERROR_MARK) :].strip()
    lines = [line for line in str(seen[-1]).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(seen[-1]).__name__
