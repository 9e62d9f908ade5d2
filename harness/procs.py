"""Process trees and the harness's identity: stopping every worker, and workers noticing their harness is gone.

Pure standard library: worker_boot imports it inside a framework's environment before anything else.

Why a tree walk and not just a process group: torchrun starts every rank in a new session of its own
(`start_new_session=True` in torch.distributed.elastic), so killing the launcher's group leaves the ranks running.
Why a watchdog thread and not only PR_SET_PDEATHSIG: the parent-death signal fires when the *thread* that forked the
child exits, which a harness that starts workers from a thread pool would trigger while the worker is still wanted;
and for ranks under torchrun the parent is torchrun, not the harness.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable

HARNESS_PID = "STEPDIFF_HARNESS_PID"
HARNESS_START = "STEPDIFF_HARNESS_START"
CLEANUP_DIR = "STEPDIFF_CLEANUP_DIR"


def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), which tells a live process from a reused pid; None
    when the process does not exist. Without /proc: 'alive' or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie has exited already
            return None
        return fields[19]
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "alive"


def is_alive(pid: int, started: str | None) -> bool:
    now = start_time(pid)
    return now is not None and (started in (None, "", "alive") or now in ("alive", started))


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(d))
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first found, breadth first). Empty without /proc."""
    kids = _children()
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            if c not in out:
                out.append(c)
                todo.append(c)
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to `pid`, its process group and every descendant and their groups (never our own group)."""
    ours = os.getpgrp()
    seen: set[int] = set()
    for _ in range(2):  # a second pass catches children forked while the first one ran
        pids = [pid, *descendants(pid)]
        for p in pids:
            if p == os.getpid():
                continue
            try:
                pg = os.getpgid(p)
                if pg != ours and pg not in seen:
                    seen.add(pg)
                    os.killpg(pg, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass


def harness_identity() -> dict[str, str]:
    """Environment variables that let a worker watch this harness process."""
    return {HARNESS_PID: str(os.getpid()), HARNESS_START: start_time(os.getpid()) or ""}


def die_with_parent() -> Callable[[], None] | None:
    """A subprocess preexec_fn: the child is SIGKILLed when the thread that started it dies (Linux PR_SET_PDEATHSIG).
    For installers (uv) that must not outlive a killed stepdiff: an orphaned `uv pip install` kept writing into the
    half-built environment the next run removes and rebuilds. That thread waits for the child the whole time, so it
    only dies with the process. libc is loaded here, in the parent: nothing is imported after the fork."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the child may outlive a killed stepdiff
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(128 + int(signal.SIGKILL))

    return preexec


def drop_dangling_tmp_link(tmp: str | None = None) -> None:
    """Remove this worker's short TMPDIR symlink (workers._short_tmp, `sd-*` in the system temp folder) once its
    target is gone: a killed stepdiff cannot remove it, and its worker's watchdog has just removed the target."""
    tmp = os.environ.get("TMPDIR", "") if tmp is None else tmp
    try:
        if os.path.basename(tmp).startswith("sd-") and os.path.islink(tmp) and not os.path.exists(tmp):
            os.unlink(tmp)
    except OSError:
        pass


def watch_harness(poll_s: float = 0.5, cleanup: Iterable[str] = ()) -> threading.Thread | None:
    """In a worker: a daemon thread that kills this process (and its descendants) when the harness that started it
    is gone (SIGKILL, a crash) or when this process's parent changes (torchrun died). Removes `cleanup` directories
    (the harness's temporary run directory) first. Returns None when no harness is named in the environment."""
    pid = os.environ.get(HARNESS_PID)
    if not pid:
        return None
    harness, started = int(pid), os.environ.get(HARNESS_START) or None
    parent = os.getppid()
    dirs = [d for d in cleanup if d]

    def loop() -> None:
        while True:
            time.sleep(poll_s)
            if is_alive(harness, started) and os.getppid() == parent:
                continue
            print(f"stepdiff worker {os.getpid()}: the stepdiff process {harness} is gone; stopping", flush=True)
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
            drop_dangling_tmp_link()
            doomed = descendants(os.getpid())
            if parent not in (harness, 1) and os.getppid() == parent:
                doomed.append(parent)  # our launcher (torchrun): it has no watchdog of its own
            for pid in doomed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            os.kill(os.getpid(), signal.SIGKILL)

    t = threading.Thread(target=loop, name="stepdiff-harness-watchdog", daemon=True)
    t.start()
    return t
