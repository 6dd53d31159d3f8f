"""The pipelined scorer: scans read and prepared in worker processes, the forward pass in this process,
the rows and files written in a thread beside the next forward pass.

``scored(scans, prepare_args, forward, finish, workers)`` yields ``(scan, row or None)`` in the order of
``scans``, as the serial scorer would, with at most ``workers + 1`` prepared scans waiting (memory stays
bounded by a few scans, whatever the cohort's size). Stage 1 (``calcjax.score.stages.prepare``: reading,
the calcium threshold, the heart region) runs in ``workers`` processes started with ``spawn`` (JAX is
loaded here, and a forked copy of it can deadlock); stage 2, ``forward(scan, prepared)``, runs here and
returns the raw labels or None; stage 3, ``finish(scan, prepared, raw, t0)``, runs in one thread while the
next scan's forward pass runs (JAX releases the interpreter while the device computes).
"""

from __future__ import annotations

import collections
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from calcjax.score import stages


class WorkerDiedError(RuntimeError):
    """A worker process that read scans ended without an answer (killed, often for memory)."""


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def _prepared(future: Future):
    """A worker's answer; WorkerDiedError when its process died."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise WorkerDiedError(
            "a scan-reading worker process died (out of memory?): rerun with --resume and fewer --workers"
        ) from None


def scored(
    scans: Iterable,
    prepare_args: tuple,
    forward: Callable,
    finish: Callable,
    workers: int,
) -> Iterator[tuple]:
    """``(scan, row or None)`` of every scan, in order (module docstring); ``prepare_args``: the
    arguments of ``stages.prepare`` after the scan."""
    todo, waiting, finishing = iter(scans), collections.deque(), collections.deque()
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    writer = ThreadPoolExecutor(1, thread_name_prefix="calcjax-score-finish")

    def top_up() -> None:
        while len(waiting) < workers + 1 and (scan := next(todo, None)) is not None:
            waiting.append((scan, time.perf_counter(), pool.submit(stages.prepare, scan, *prepare_args)))

    try:
        top_up()
        while waiting:
            scan, t0, future = waiting.popleft()
            prepared = _prepared(future)
            top_up()
            raw = forward(scan, prepared)
            row = _done(None) if raw is None else writer.submit(finish, scan, prepared, raw, t0)
            finishing.append((scan, row))
            while len(finishing) > 1:
                done_scan, done_row = finishing.popleft()
                yield done_scan, done_row.result()
        while finishing:
            done_scan, done_row = finishing.popleft()
            yield done_scan, done_row.result()
    finally:
        writer.shutdown(wait=True)
        pool.shutdown(wait=True, cancel_futures=True)
