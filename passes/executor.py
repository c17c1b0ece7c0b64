"""Where per-layer work runs: in this process, on every local core, or on a cluster.

Weight passes (``quant`` RTN and GPTQ, ``shiftadd``'s BCQ fits, ``prune``) hand their
per-layer numerics to ``ctx.executor.map(fn, items)``. A work item is a picklable pure
function of arrays and options, ``fn(item) -> result`` (a module-level function, or a
``functools.partial`` of one with picklable arguments: a frozen pass dataclass is), so
any executor gives the same bytes as running them in order here; only the graph
rewriting that follows stays in the main process, in layer order.

* :class:`SerialExecutor`: one item after another (``jobs=1``, the default).
* :class:`ProcessExecutor`: a local process pool (``jobs=N``; ``0`` = every core). Items
  are pulled from ``items`` lazily, at most ``2 * jobs`` in flight, so a pass that yields
  one layer's float weight at a time holds ``2 * jobs`` of them, never the whole model.
* :class:`RayExecutor`: the plug-in point for models that outgrow one machine: the same
  ``map`` through Ray tasks (``jobs`` = tasks in flight), used only when ``ray`` is
  installed (it is not a dependency; connect with ``ray.init(address=...)`` before
  compiling, else Ray starts a local instance). Any object with this ``map`` works:
  pass it as ``compile(..., executor=...)``.

Worker processes limit their BLAS threads to ``max(1, cores // jobs)`` so that ``jobs``
workers do not oversubscribe the cores; results do not depend on it (NumPy's BLAS
routines used here give the same bytes for any thread count, checked by the tests).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Executor(Protocol):
    """Runs a pure function over work items; results in the items' order."""

    jobs: int

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]: ...

    def close(self) -> None: ...


class SerialExecutor:
    """Every item in this process, in order."""

    jobs = 1

    def map(self, fn: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
        return [fn(item) for item in items]

    def close(self) -> None:
        pass


def _limit_threads(threads: int) -> None:
    """Worker initializer: BLAS/OpenMP threads per worker (before NumPy computes anything)."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:  # without threadpoolctl the environment above applies to fresh BLAS pools
        pass


class ProcessExecutor:
    """A pool of ``jobs`` local worker processes (``forkserver``: safe beside ONNX Runtime's threads)."""

    def __init__(self, jobs: int = 0) -> None:
        self.jobs = jobs if jobs > 0 else (os.cpu_count() or 1)
        self._pool: ProcessPoolExecutor | None = None

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            threads = max(1, (os.cpu_count() or 1) // self.jobs)
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context(method),
                                             initializer=_limit_threads, initargs=(threads,))
        return self._pool

    def map(self, fn: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
        pool = self._start()
        return _windowed(lambda item: pool.submit(fn, item), items, 2 * self.jobs, Future.result)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor:
    """The same ``map`` through Ray tasks (``ray`` must be importable; it is optional)."""

    def __init__(self, jobs: int = 0) -> None:
        import ray  # noqa: F401  (ImportError tells the caller Ray is not there)

        self.jobs = jobs if jobs > 0 else (os.cpu_count() or 1)

    def map(self, fn: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
        import ray

        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        remote = ray.remote(fn)
        return _windowed(lambda item: remote.remote(item), items, 2 * self.jobs, ray.get)

    def close(self) -> None:
        pass


def _windowed(submit: Callable[[Any], Any], items: Iterable[Any], window: int,
              wait: Callable[[Any], Any]) -> list[Any]:
    """Submit items lazily with at most ``window`` in flight; results in order."""
    results: list[Any] = []
    pending: deque = deque()
    iterator: Iterator[Any] = iter(items)
    try:
        for item in iterator:
            pending.append(submit(item))
            if len(pending) >= window:
                results.append(wait(pending.popleft()))
        while pending:
            results.append(wait(pending.popleft()))
    finally:
        for handle in pending:
            if isinstance(handle, Future):
                handle.cancel()
    return results


def make_executor(jobs: int = 1, backend: str = "local") -> Executor:
    """``jobs=1``: serial; else a local process pool (``jobs=0``: every core), or Ray's."""
    if backend == "ray":
        return RayExecutor(jobs)
    if jobs == 1 or (jobs == 0 and (os.cpu_count() or 1) == 1):
        return SerialExecutor()
    return ProcessExecutor(jobs)
