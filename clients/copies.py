"""The block copies of one large request, spread over a few threads.

One core copies 10-20 GB/s; a socket's memory moves several times that. A request that moves tens of
megabytes (a long prefix read back before a prefill) is bound by that one core, so it is cut into runs of
whole blocks of about equal bytes, the caller copies the first run and helper threads the others (the native
copy releases the GIL). Small requests stay on the caller's thread: handing work to a thread costs tens of
microseconds.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

PARALLEL_BYTES = 16 << 20
"""A request moving at least this many bytes has its copies spread over the threads."""

Copy = tuple[Callable[..., Any], tuple[Any, ...], int]
"""A copy to make: the function, its arguments, and the bytes it moves."""


def default_threads() -> int:
    """``$KVRACK_COPY_THREADS``, else the CPUs this process may run on, at most 4: the caller waits for a
    large request's copies, so for that moment the other cores are better used copying; beyond about 4
    threads one socket's memory bandwidth is the limit, not the cores."""
    env = os.environ.get("KVRACK_COPY_THREADS")
    if env:
        try:
            threads = int(env)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"KVRACK_COPY_THREADS must be a whole number of at least 1, got {env!r}")
        return threads
    return max(1, min(4, len(os.sched_getaffinity(0))))


def runs(sizes: Sequence[int], parts: int) -> list[range]:
    """Cut copies of ``sizes`` bytes, in order, into at most ``parts`` runs of about equal bytes."""
    total = sum(sizes)
    out: list[range] = []
    start = done = 0
    for i, n in enumerate(sizes):
        done += n
        if done * parts >= total * (len(out) + 1) and len(out) < parts - 1:
            out.append(range(start, i + 1))
            start = i + 1
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


class CopyPool:
    """Helper threads for one client's large requests (made on the first such request, ended by ``close``)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = default_threads() if threads is None else threads
        if self.threads < 1:
            raise ValueError(f"copy_threads must be at least 1, got {self.threads}")
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0  # the process the threads belong to: a forked child makes its own
        self._lock = threading.Lock()
        self.parallel_requests = 0  # requests whose copies were spread over threads

    def run(self, copies: Sequence[Copy], shareable: bool = True) -> None:
        """Make every copy; returns when all are done, raising the first error any of them raised.
        ``shareable`` False keeps them on the caller's thread (copies too small to run without the GIL).

        Whatever happens (an error in any copy, an interrupt while waiting), no helper is still copying when
        this returns: the caller's next step (a commit, an abort, a release) may free the memory involved."""
        total = sum(c[2] for c in copies)
        if not shareable or self.threads == 1 or len(copies) < 2 or total < PARALLEL_BYTES:
            _copy_all(copies)
            return
        groups = runs([c[2] for c in copies], self.threads)
        self.parallel_requests += 1
        futures: list[Future[None]] = []
        error: BaseException | None = None
        try:
            executor = self._pool()
            for g in groups[1:]:
                futures.append(executor.submit(_copy_all, [copies[i] for i in g]))
            _copy_all([copies[i] for i in groups[0]])
        except BaseException as exc:
            error = exc
        while True:  # every helper has finished with the buffers before this returns
            try:
                wait(futures)
                break
            except BaseException as exc:  # an interrupt while waiting: keep waiting, raise it after
                error = error or exc
        for f in futures:
            error = error or f.exception()
        if error is not None:
            raise error

    def _pool(self) -> ThreadPoolExecutor:
        if self._pid != os.getpid():  # a forked child: the parent's threads, and maybe its lock, are not here
            self._lock = threading.Lock()
            self._executor = None
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="kvrack-copy")
                self._pid = os.getpid()
            return self._executor

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None and self._pid == os.getpid():
            executor.shutdown(wait=True)


def _copy_all(copies: Sequence[Copy]) -> None:
    for fn, args, _ in copies:
        fn(*args)
