"""The plumbing under stepdiff.harness.schedule: the cores jobs share, one lane (a one-thread executor) per worker
key, the keys of the reference and framework workers, worker start-up, and the command's trace and log lines."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from . import envs, progress
from .pool import WorkerKey, WorkerPool, default_jobs
from .spec import Spec


class Cores:
    """A weighted semaphore over `capacity` cores (a world-size-2 worker takes two). Waiters are served by priority,
    then first come first served: the reference (it gates every comparison) before framework runs."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.free = self.capacity
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int]] = []
        self._seq = 0

    @contextmanager
    def hold(self, weight: int, priority: int = 1) -> Iterator[None]:
        weight = max(1, min(weight, self.capacity))
        with self._cond:
            self._seq += 1
            me = (priority, self._seq)
            self._waiting.append(me)
            while min(self._waiting) != me or self.free < weight:
                self._cond.wait()
            self._waiting.remove(me)
            self.free -= weight
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self.free += weight
                self._cond.notify_all()


REFERENCE_FIRST, FRAMEWORK = 0, 1


def intra_op_threads(concurrent: int) -> dict[str, str]:
    """Intra-op threads per rank when `concurrent` ranks run at once, so that they do not oversubscribe the cores (a
    user's own OMP_NUM_THREADS wins). Oversubscribed OpenMP pools spin against each other: two 2-thread workers on 2
    cores made a tiny-model request 10-30x slower (0.04 s -> 0.8-2.2 s). Thread count changes float summation order
    only (~1e-7 relative in fp32), which the float64 calibration covers."""
    if "OMP_NUM_THREADS" in os.environ or concurrent <= 1:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, cores // concurrent))}


class Lanes:
    """One command's lanes, the cores they share and its workers' keys (the scheduler's plumbing)."""

    def __init__(self, pool: WorkerPool, jobs: int | None = None, log: Callable[[str], None] | None = None) -> None:
        self.pool = pool
        self.jobs = jobs or default_jobs()
        self.cores = Cores(self.jobs)
        self.log = log
        """Extra one-line records (the progress display, stepdiff.harness.progress, reports every run anyway)."""
        self._lanes: dict[WorkerKey, ThreadPoolExecutor] = {}
        self._lanes_lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._trace = bool(os.environ.get("STEPDIFF_TRACE"))

    def trace(self, what: str) -> None:
        """A time-stamped event on stderr when STEPDIFF_TRACE is set (where a command's wall time goes)."""
        if self._trace:
            with self._log_lock:
                print(f"stepdiff trace: {time.perf_counter() - self._t0:7.2f} s [{threading.current_thread().name}] "
                     f"{what}")

    def say(self, text: str) -> None:
        with self._log_lock:
            if self.log is not None:
                self.log(text)
            else:
                progress.log(text)

    def lane(self, key: WorkerKey) -> ThreadPoolExecutor:
        with self._lanes_lock:
            ex = self._lanes.get(key)
            if ex is None:
                ex = self._lanes[key] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lane-{key.adapter}")
            return ex

    def thread_env(self, world_size: int) -> dict[str, str]:
        return intra_op_threads(self.jobs)

    def reference_key(self, device: str) -> WorkerKey:
        host = envs.host_environment()
        return WorkerKey("reference", host.python, 1, device, tuple(sorted(self.thread_env(1).items())), "reference")

    def framework_key(self, pin: Any, env: envs.Environment, spec: Spec) -> WorkerKey:
        from .runner import worker_env

        extra = {**self.thread_env(spec.batch.world_size), **worker_env(env)}
        return WorkerKey(pin.name, env.python, spec.batch.world_size, spec.run.device, tuple(sorted(extra.items())))

    def close(self, cancel: bool = False) -> None:
        for ex in list(self._lanes.values()):
            ex.shutdown(wait=True, cancel_futures=cancel)

    def start(self, key: WorkerKey, timeout: float) -> None:
        """Inside a job's core: start the key's worker if it is not running (imports, distributed init)."""
        if self.pool.fresh(key):
            self.trace(f"{key.adapter} worker starting")
            waited = self.pool.warm(key, timeout)  # WorkerError: it died starting (the job's error; replaced later)
            self.trace(f"{key.adapter} worker ready ({waited:.1f} s)")


def reference_timeout(spec: Spec) -> tuple[float, tuple[str, ...]]:
    """The reference's own timeout (run.reference_timeout_s) and the field a timeout message names."""
    return float(spec.run.reference_timeout_s), ("run.reference_timeout_s",)
