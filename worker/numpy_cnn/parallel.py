"""Python threads over independent pieces of work (batch chunks, parameter slices).

NumPy releases the GIL inside ufunc loops, copies and BLAS calls, so threads give real
parallelism for the memory-bound parts (im2col, pooling masks, optimizer updates) that a
multi-threaded BLAS leaves on one core. Once our threads are in use, OpenBLAS is held to one
thread for the whole process and large GEMMs are split over our threads instead
(:func:`parallel_matmul`).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")

THREAD_PREFIX = "numpy-cnn"

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_blas_limited = False
#: Marks a thread running parallel_map's items, so a nested call there runs inline.
_region = threading.local()


def _forget_pool_after_fork() -> None:
    """A forked child (a Celery prefork worker, a test's subprocess) inherits the pool object
    but not its threads; using it would wait forever. The child builds its own."""
    global _pool, _lock
    _pool = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def num_threads() -> int:
    """Threads to use: $LABCTL_NUMPY_THREADS, else the CPUs this process may run on."""
    configured = os.environ.get("LABCTL_NUMPY_THREADS")
    if configured:
        if not configured.strip().isdigit() or int(configured) < 1:
            raise ValueError(f"LABCTL_NUMPY_THREADS must be a whole number >= 1, "
                             f"got {configured!r}")
        return int(configured)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(num_threads(), thread_name_prefix=THREAD_PREFIX)
        return _pool


def _on_threads(work: Callable[[], None], threads: int) -> None:
    """``work()`` on the calling thread and ``threads - 1`` pool threads at once, returning
    when all have returned. Each runs marked as inside a parallel region (a nested call runs
    inline) and with the caller's floating-point error settings: np.errstate is per thread,
    so a caller silencing overflow (the engine, before reporting divergence) silences ours."""
    use_single_threaded_blas()
    settings = np.geterr()

    def drain() -> None:
        _region.active = True
        try:
            with np.errstate(**settings):
                work()
        finally:
            _region.active = False

    pool = _get_pool()
    helpers = [pool.submit(drain) for _ in range(threads - 1)]
    drain()
    for helper in helpers:
        helper.result()


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]`` on the calling thread and the pool's; results keep
    the items' order, so any reduction the caller does over them is deterministic.

    The caller works too, and every thread claims the next item when it is free, so a call
    wakes each helper thread once instead of handing over every item: on this 2-vCPU VM a
    wake-up takes ~20-50 us, and handing each of a step's ~120 chunks to the pool through
    futures made case (d) of the benchmark 15% slower at two threads (measured).
    """
    threads = min(num_threads(), len(items))
    # Inline when there is nothing to share, and inside a parallel region: a pool thread
    # waiting there for the pool's other threads could deadlock it.
    if threads <= 1 or getattr(_region, "active", False):
        return [fn(item) for item in items]
    results: list = [None] * len(items)
    claims = itertools.count()  # next() on it is atomic under the GIL
    failures: list[BaseException] = []

    def drain() -> None:
        for index in claims:
            if index >= len(items) or failures:
                return
            try:
                results[index] = fn(items[index])
            except BaseException as error:  # re-raised in the caller below
                failures.append(error)
                return

    _on_threads(drain, threads)
    if failures:
        raise failures[0]
    return results


@dataclass
class Stage:
    """One block's chunk loop, as :func:`run_stages` runs it: ``run`` on each of ``chunks``
    (contiguous batch slices in order), writing those images' rows of ``output`` (the next
    stage's input; None when nothing follows), then ``finish`` on the results in chunk order.
    """

    run: Callable[[slice], Any]
    chunks: Sequence[slice]
    output: np.ndarray | None
    finish: Callable[[list], None] = field(default=lambda results: None)


class _Pipeline:
    """The shared state of one :func:`run_stages` call; every field is guarded by ``cond``."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = stages
        self.claimed = [0] * len(stages)             # chunks handed out, per stage
        self.finished = [[False] * len(s.chunks) for s in stages]
        self.prefix = [0] * len(stages)              # chunks finished without a gap
        self.images_ready = [0] * len(stages)        # images that prefix covers
        self.unclaimed = sum(len(s.chunks) for s in stages)
        self.results = [[None] * len(s.chunks) for s in stages]
        self.failure: BaseException | None = None
        self.cond = threading.Condition(threading.Lock())

    def _claim(self) -> tuple[int, int] | None:
        # Stages in order: a thread moves on to the next stage only when the current one has
        # no chunk left, where it would otherwise wait for the other threads. Taking the
        # deepest ready chunk first instead (the input it reads was written last) was 3%
        # slower on cases (c) and (d), one thread or two: it spreads each thread over more
        # blocks' buffers and weights at once (measured).
        for s in range(len(self.stages)):
            j, chunks = self.claimed[s], self.stages[s].chunks
            if j < len(chunks) and (s == 0 or self.images_ready[s - 1] >= chunks[j].stop):
                self.claimed[s] = j + 1
                self.unclaimed -= 1
                return s, j
        return None

    def work(self) -> None:
        cond = self.cond
        cond.acquire()
        try:
            while self.unclaimed and self.failure is None:
                task = self._claim()
                if task is None:
                    cond.wait()
                    continue
                s, j = task
                stage = self.stages[s]
                cond.release()
                try:
                    result = stage.run(stage.chunks[j])
                except BaseException as error:  # re-raised in the caller
                    cond.acquire()
                    self.failure = self.failure or error
                    cond.notify_all()
                    return
                cond.acquire()
                self.results[s][j] = result
                done = self.finished[s]
                done[j] = True
                advanced = False
                while self.prefix[s] < len(done) and done[self.prefix[s]]:
                    self.images_ready[s] = stage.chunks[self.prefix[s]].stop
                    self.prefix[s] += 1
                    advanced = True
                if advanced:
                    cond.notify_all()
        finally:
            cond.release()


def run_stages(stages: Sequence[Stage]) -> None:
    """Run consecutive blocks' chunk loops as one pipeline over the batch: a chunk of stage
    s + 1 starts as soon as stage s has finished every image it covers, not after all of
    stage s. Every block works image by image, so that is all it waits for.

    Each thread (the caller's and the pool's) takes the first chunk that is ready. Against
    a meeting of the threads after every block this saves the time one thread idles while
    the others finish the block's last chunks: once per pipeline instead of once per block
    (cases (c) and (d) of the benchmark 2-5% faster at two threads, measured). Each stage's
    ``finish`` then gets its results in chunk order, whatever the threads' timing, so its
    reductions are deterministic.
    """
    pipeline = _Pipeline(stages)
    threads = min(num_threads(), pipeline.unclaimed)
    if threads > 1 and not getattr(_region, "active", False):
        _on_threads(pipeline.work, threads)
    else:
        pipeline.work()
    if pipeline.failure is not None:
        raise pipeline.failure
    for stage, results in zip(stages, pipeline.results, strict=True):
        stage.finish(results)


def sum_in_order(partials: Sequence[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Element-wise sum of :func:`parallel_map`'s per-chunk tuples (e.g. weight and bias
    gradients), in chunk order whatever the threads' timing, so results are reproducible.
    Sums into the first tuple's arrays."""
    total = partials[0]
    for part in partials[1:]:
        for acc, value in zip(total, part, strict=True):
            acc += value
    return total


def split_evenly(total: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices covering ``range(total)``, sizes differing by at most 1."""
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def batch_chunks(total: int, per_chunk: int) -> list[slice]:
    """Slices of ``range(total)`` of about ``per_chunk`` each (at least one), as many as a
    multiple of the thread count, so the threads finish together: 5 chunks on 2 threads
    leave one thread idle for a fifth of the loop."""
    threads = num_threads()
    parts = -(-total // max(1, per_chunk))
    return split_evenly(total, threads * -(-parts // threads))


def use_single_threaded_blas() -> None:
    """Hold BLAS (OpenBLAS under NumPy) to one thread for the rest of the process.

    Our threads call BLAS concurrently on independent chunks, so BLAS's own threads would
    only oversubscribe the cores. It is set once, not per region: changing OpenBLAS's
    thread count between calls made its next multi-threaded GEMM 10-30x slower (measured).
    Without threadpoolctl this is a no-op; set OPENBLAS_NUM_THREADS=1 before NumPy loads.
    """
    global _blas_limited
    with _lock:
        if _blas_limited:
            return
        _blas_limited = True
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - shipped with scikit-learn
            return
        threadpool_limits(limits=1, user_api="blas")


#: Below this many multiply-adds a GEMM is not worth splitting over threads.
MIN_PARALLEL_MACS = 1 << 20


def parallel_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for 2-D arrays, the columns of the result split over threads.

    Each thread writes its own column block and nothing is reduced across threads, so the
    result is bitwise the same whatever the thread count or timing.
    """
    m, k = a.shape
    n = b.shape[1]
    threads = num_threads()
    if threads == 1 or m * k * n < MIN_PARALLEL_MACS or n < 2 * threads:
        return np.dot(a, b)  # releases the GIL whatever the output's size (see sum_along)
    out = np.empty((m, n), np.result_type(a, b))

    def block(part: slice) -> None:
        np.matmul(a, b[:, part], out=out[:, part])

    parallel_map(block, split_evenly(n, threads))
    return out
