"""A pool of long-lived workers: one per (adapter, environment, world size, device), serving every spec of a command.

A framework worker spends seconds importing its framework and starting its distributed group, and milliseconds on a
tiny model's step; a pool pays the first once per command (`stepdiff run A.toml B.toml`, one pytest session, a fuzz
campaign, a bisection) instead of once per case. A worker that crashed, failed or timed out was killed by
`Worker.submit` (its WorkerError stays with the request, i.e. the case, that caused it); the next request for the same
key gets a fresh worker in a fresh directory, so no later case inherits its state, its files or its log.

Workers keep the semantics of `stepdiff.harness.workers.Worker`: each is registered for signal handling and dies with
its harness. The pool only decides which worker serves a request, and serialises requests per worker (a worker serves
one request at a time).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WorkerError
from .workers import Worker, tail


@dataclass(frozen=True)
class WorkerKey:
    adapter: str
    python: str
    world_size: int
    device: str
    env: tuple[tuple[str, str], ...] = ()
    role: str = "framework"



@dataclass
class _Slot:
    number: int
    """The slot's place in the pool: worker folders are `<adapter>-<number>[-<generation>]`, short on purpose
    (a worker's TMPDIR lives inside its folder, and AF_UNIX socket paths there must stay under 108 bytes)."""
    worker: Worker | None = None
    generation: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    last_used: float = 0.0


class WorkerPool:
    """Workers by key, started on first use, replaced after a failure, closed together. At most `max_workers` stay
    alive: starting one more closes the least recently used idle worker (a long pytest session touching many
    framework releases must not keep every one of them in memory)."""

    def __init__(self, root: Path | None = None, max_workers: int | None = None) -> None:
        self.max_workers = max_workers or default_max_workers()
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="stepdiff-pool-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._slots: dict[WorkerKey, _Slot] = {}
        self._lock = threading.Lock()
        self.started = 0
        """Workers started over the pool's life (a measure of reuse: fewer is better)."""
        self.start_times: dict[Path, float] = {}
        """Wall-clock start (time.time()) of each worker, by its directory."""
        self.closed = False

    def _slot(self, key: WorkerKey) -> _Slot:
        with self._lock:
            if self.closed:
                raise RuntimeError("the worker pool is closed")
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(len(self._slots) + 1)
            return slot

    def _live_worker(self, key: WorkerKey, slot: _Slot) -> Worker:
        w = slot.worker
        if w is not None and w.proc is not None and not w.alive():
            w.kill()  # reap it and drop it from the live set; its log stays in its own directory
            w = slot.worker = None
        if w is None:
            slot.generation += 1
            slot.requests = 0
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key.adapter)
            wdir = self.root / (f"{safe}-{slot.number}" + (f"-{slot.generation}" if slot.generation > 1 else ""))
            w = Worker(key.adapter, key.python, key.world_size, key.device, env=dict(key.env), workdir=wdir,
                       role=key.role)
            slot.worker = w
        if w.proc is None:
            self._evict(keep=slot)
            w.start()
            with self._lock:
                self.started += 1
                self.start_times[w.dir] = time.time()
        slot.last_used = time.monotonic()
        return w

    def _evict(self, keep: _Slot) -> None:
        """Close least recently used idle workers until one more fits under max_workers."""
        while True:
            with self._lock:
                live = [s for s in self._slots.values() if s is not keep and s.worker is not None and s.worker.alive()]
                if len(live) < self.max_workers:
                    return
                idle = sorted((s for s in live if not s.lock.locked()), key=lambda s: s.last_used)
            if not idle:
                return  # every live worker is busy: run over the limit rather than wait
            victim = idle[0]
            if victim.lock.acquire(blocking=False):
                try:
                    if victim.worker is not None:
                        victim.worker.kill()
                        victim.worker = None
                finally:
                    victim.lock.release()

    @contextmanager
    def lease(self, key: WorkerKey) -> Iterator[Worker]:
        """Exclusive use of the key's live worker (started if needed) for one or more requests."""
        slot = self._slot(key)
        with slot.lock:
            yield self._live_worker(key, slot)

    def submit(self, key: WorkerKey, request: dict[str, object], timeout_s: float, *args: object) -> dict[str, object]:
        """One request on the key's worker. A WorkerError (crash, failure, timeout) leaves the worker dead: the next
        request on this key starts a fresh one."""
        slot = self._slot(key)
        with slot.lock:
            w = self._live_worker(key, slot)
            slot.requests += 1
            return w.submit(request, timeout_s, *args)  # type: ignore[arg-type]

    def fresh(self, key: WorkerKey) -> bool:
        """Whether the key's next request starts a worker or meets one that has served nothing yet."""
        slot = self._slot(key)
        w = slot.worker
        return w is None or slot.requests == 0 or (w.proc is not None and not w.alive())

    def warm(self, key: WorkerKey, timeout_s: float) -> float:
        """Start the key's worker (if needed) and wait until every rank finished its set-up (imports, distributed
        init); returns the seconds waited. A worker that dies while starting raises WorkerError."""
        slot = self._slot(key)
        t0 = time.monotonic()
        with slot.lock:
            w = self._live_worker(key, slot)
            deadline = t0 + timeout_s
            while len(list(w.dir.glob("ready.*"))) < key.world_size:
                if not w.alive():
                    code = w.proc.returncode if w.proc else None
                    w.kill()
                    raise WorkerError(f"{key.adapter} worker exited with code {code} while starting", tail(w.log))
                if time.monotonic() > deadline:
                    return time.monotonic() - t0  # the request's own timeout decides what happens next
                time.sleep(0.02)
        return time.monotonic() - t0

    def workers(self) -> list[Worker]:
        with self._lock:
            return [s.worker for s in self._slots.values() if s.worker is not None]

    def abort(self, close: bool = True) -> None:
        """Kill every worker now (an interrupted command); with `close`, refuse new ones too."""
        if close:
            with self._lock:
                self.closed = True
        for w in self.workers():
            w.kill()

    def close(self, grace_s: float = 1.0) -> None:
        """Ask every worker to shut down, give them `grace_s` together, then kill what is left. Every record is on
        disk before its request is answered, so nothing is lost; a worker's own interpreter teardown (seconds with a
        framework loaded, x5 workers) is not worth waiting for."""
        with self._lock:
            self.closed = True
            workers = [s.worker for s in self._slots.values() if s.worker is not None]
        for w in workers:
            if w.alive():
                try:
                    (w.dir / f"req-{w.next_request:04d}.json").write_text('{"shutdown": true}')
                except OSError:
                    pass
        deadline = time.monotonic() + grace_s
        while any(w.alive() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.02)
        for w in workers:
            w.kill()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and exc_type is not WorkerError:
            self.abort()  # interrupted: no graceful shutdown
        self.close()


_SHARED: list[WorkerPool] = []


@contextmanager
def shared_pool(root: Path | None = None, max_workers: int | None = None) -> Iterator[WorkerPool]:
    """Install a pool that every run without an explicit pool uses until the block ends (a test session, a notebook):
    `with shared_pool(): run_case(...); run_case(...)` starts each worker once."""
    pool = WorkerPool(root, max_workers)
    _SHARED.append(pool)
    try:
        yield pool
    finally:
        _SHARED.remove(pool)
        pool.close()


def current_pool() -> WorkerPool | None:
    """The innermost `shared_pool`, if any."""
    return _SHARED[-1] if _SHARED else None


def default_max_workers() -> int:
    """Workers kept alive at once: ~1.5 GiB each out of the available memory, at least 4 (a reference and three
    frameworks), at most 12."""
    avail = _available_memory_gib()
    return max(4, min(12, int(avail / 1.5))) if avail is not None else 8


def default_jobs() -> int:
    """How many workers may run at once: the cores, fewer when memory is short (~1.5 GiB per framework worker)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    avail = _available_memory_gib()
    by_memory = int(avail / 1.5) if avail is not None else cores
    return max(1, min(cores, by_memory))


def _available_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None
