"""Where the expensive, independent parts of a compile run: one interface, three engines.

An :class:`Executor` maps a module-level function over a list of picklable tasks and returns
the results in order. ``--auto`` hands it its candidate plans, ``optimize-many`` its models.

- :class:`Serial` (the default): in this process, one after the other.
- :class:`Processes` (``--jobs N``): a local pool of N worker processes (spawned, so nothing of
  the parent's ONNX Runtime state is shared). The workers and the parent share one
  measurement lock (:func:`onnxcomp.timing.share_measurements`): no two of them time a model
  at once, though the others keep computing beside a measurement, so on a machine with few
  cores the latencies a worker measures are noisier than a serial run's. For choices that
  must not move, warm a ``--latency-cache`` with a serial run first: a run that finds its
  measurements in the cache makes the same choices with any number of jobs.
- :class:`RayExecutor` (``--executor ray``, the ``onnxcomp[ray]`` extra): tasks of a Ray
  cluster (``address``; a local Ray runtime when none). Each task times on the node that runs
  it, which the report records (``measured_on``): latency is a property of the machine that
  deploys, so run it where you deploy.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import platform
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from onnxcomp import timing
from onnxcomp.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

KINDS = ("local", "ray")
# What a spawned worker reads for its thread count: onnxcomp's compile sessions and BLAS.
THREAD_ENV = ("ONNXCOMP_COMPUTE_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "MKL_NUM_THREADS")


class Executor(Protocol):
    """Runs ``fn`` over ``tasks``; results in the order of the tasks."""

    jobs: int
    kind: str

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """``[fn(t) for t in tasks]``, maybe in parallel; the first error is raised."""
        ...


class Serial:
    """In this process, one task after the other."""

    jobs = 1
    kind = "serial"

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """Run the tasks here, in order."""
        return [fn(t) for t in tasks]


class Processes:
    """A local pool of ``jobs`` spawned worker processes sharing one measurement lock."""

    kind = "processes"

    def __init__(self, jobs: int) -> None:
        if jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {jobs}")
        self.jobs = jobs

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """Run the tasks in up to ``jobs`` workers (here when there is only one task)."""
        if len(tasks) <= 1 or self.jobs == 1:
            return [fn(t) for t in tasks]
        context = multiprocessing.get_context("spawn")
        lock = context.RLock()
        previous = timing.shared_lock()
        timing.share_measurements(lock)  # the parent times under the workers' lock too
        workers = min(self.jobs, len(tasks))
        # Each worker gets its share of the cores for compile work (ORT sessions, BLAS):
        # the engine already uses every core in one process, and workers that each did
        # would oversubscribe them (BLAS threads spin while they wait).
        share = str(max(1, (os.cpu_count() or 1) // workers))
        saved = {k: os.environ.get(k) for k in THREAD_ENV}
        os.environ.update(dict.fromkeys(THREAD_ENV, share))
        try:
            with concurrent.futures.ProcessPoolExecutor(
                    max_workers=workers, mp_context=context,
                    initializer=timing.share_measurements, initargs=(lock,)) as pool:
                return list(pool.map(fn, tasks))
        finally:
            timing.share_measurements(previous)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class RayExecutor:
    """Tasks of a Ray cluster (``address``), or of a local Ray runtime started here."""

    kind = "ray"

    def __init__(self, jobs: int | None = None, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("--executor ray needs Ray: pip install 'onnxcomp[ray]'") from exc
        self._ray = ray
        self.address = address
        self.jobs = jobs or os.cpu_count() or 1
        self._started = False

    def _init(self) -> None:
        if self._ray.is_initialized():
            return
        if self.address:
            self._ray.init(address=self.address, log_to_driver=False)
        else:
            self._ray.init(num_cpus=self.jobs, include_dashboard=False, log_to_driver=False)
        self._started = True

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """One Ray task per item (one CPU each), gathered in order."""
        self._init()
        remote = self._ray.remote(num_cpus=1)(fn)
        return list(self._ray.get([remote.remote(t) for t in tasks]))

    def close(self) -> None:
        """Stop the local Ray runtime this executor started (a cluster is left running)."""
        if self._started:
            self._ray.shutdown()
            self._started = False


def make(kind: str = "local", jobs: int = 1, address: str | None = None) -> Any:
    """The executor for ``--executor KIND --jobs N``: Serial, Processes or RayExecutor."""
    if kind == "ray":
        return RayExecutor(jobs if jobs > 1 else None, address)
    if kind != "local":
        raise ConfigError(f"--executor must be one of {', '.join(KINDS)}, got '{kind}'")
    return Processes(jobs) if jobs > 1 else Serial()


def where() -> str:
    """The machine a measurement is made on (host and CPU), for the report."""
    from onnxcomp.latency_cache import cpu_name

    return f"{platform.node()} ({cpu_name()}, {os.cpu_count()} cpus)"
