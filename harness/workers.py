"""Launching and talking to worker processes (the harness side of worker_main's file protocol).

A worker is one process (world size 1) or a torchrun group (world size > 1) running an adapter inside an
environment's python. The harness enforces a timeout, captures stdout/stderr to a log, and turns a crash, a hang or an
exception on ANY rank into a WorkerError carrying the tail of the framework's own output. Never a pass.

Every live worker is registered here, so that a signal (SIGTERM, SIGINT, SIGHUP) stops them all at once
(`stop_all`): each worker's whole process tree is killed (torchrun puts each rank in a session of its own, so a
process group is not enough). A worker also watches its harness (stepdiff.harness.procs.watch_harness) and stops
itself when the harness dies without stopping it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from stepdiff._util import free_port

from . import procs
from .errors import UnsupportedError, WorkerError
from .worker_main import result_path

PACKAGES = ("stepdiff", "stepdiff.harness", "stepdiff.adapters", "stepdiff.reports")
RUN_DIR_PREFIX = "stepdiff-run-"
OWNER_FILE = ".stepdiff-owner"

_LIVE: set[Worker] = set()
_LIVE_LOCK = threading.RLock()  # re-entrant: stop_all() runs inside signal handlers
_OWNED_DIRS: set[Path] = set()
"""Temporary run directories this process created (a worker is told to remove them if this process dies)."""


def package_paths() -> dict[str, str]:
    """Where this host's stepdiff packages live (works for wheel and editable installs)."""
    out = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"cannot locate package {name}")
        out[name] = list(spec.submodule_search_locations)[0]
    return out


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(text[-lines:])


def make_run_dir(prefix: str = RUN_DIR_PREFIX) -> Path:
    """A temporary run directory owned by this process. Stale ones left by a stepdiff process that was killed
    (SIGKILL leaves no chance to clean up) are removed first."""
    sweep_stale_run_dirs(prefix)
    d = Path(tempfile.mkdtemp(prefix=prefix))
    (d / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "start": procs.start_time(os.getpid())}))
    _OWNED_DIRS.add(d)
    return d


def remove_run_dir(d: Path) -> None:
    _OWNED_DIRS.discard(d)
    shutil.rmtree(d, ignore_errors=True)


def sweep_stale_run_dirs(prefix: str = RUN_DIR_PREFIX) -> list[Path]:
    """Remove temporary run directories whose owning stepdiff process no longer exists."""
    removed: list[Path] = []
    root = Path(tempfile.gettempdir())
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return removed
    for d in candidates:
        try:
            owner = json.loads((d / OWNER_FILE).read_text())
            if os.stat(d).st_uid != os.getuid():
                continue
        except (OSError, ValueError):
            continue  # not ours to judge (an older layout, another user, being created right now)
        if not procs.is_alive(int(owner.get("pid", 0)), owner.get("start")):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    for link in root.glob("sd-*"):  # short TMPDIR links (_short_tmp) whose worker folder is gone
        try:
            if link.is_symlink() and not link.exists() and link.lstat().st_uid == os.getuid():
                link.unlink()
        except OSError:
            pass
    return removed


def live_workers() -> list[Worker]:
    with _LIVE_LOCK:
        return list(_LIVE)


def stop_all() -> list[str]:
    """Kill every live worker's process tree now (signal handling). Returns what was stopped, for the message."""
    stopped = []
    for w in live_workers():
        stopped.append(w.describe())
        w.kill()
    return stopped


class Worker:
    """One adapter in one environment, serving requests until closed."""

    def __init__(self, adapter: str, python: str, world_size: int = 1, device: str = "cpu",
                 env: dict[str, str] | None = None, workdir: Path | None = None, role: str = "framework") -> None:
        self.adapter, self.python, self.world_size, self.device = adapter, python, world_size, device
        self.role = role
        """'reference' or 'framework': named in timeout messages, which are reported separately."""
        self.extra_env = dict(env or {})
        self.own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"stepdiff-{adapter}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.next_request = 0

    def describe(self) -> str:
        pid = self.proc.pid if self.proc else "-"
        return f"{self.adapter} worker (pid {pid}, world size {self.world_size})"

    def command(self) -> list[str]:
        boot = str(Path(package_paths()["stepdiff.harness"]) / "worker_boot.py")
        args = ["--adapter", self.adapter, "--dir", str(self.dir), "--device", self.device]
        if self.world_size == 1:
            return [self.python, boot, *args]
        # world size > 1: torchrun's own rendezvous (an existing launcher, not a home-made one)
        return [self.python, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                str(self.world_size), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                boot, *args]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                          "MASTER_", "PYTHONPATH"))}
        env.update({
            "STEPDIFF_PATHS": json.dumps(package_paths()),
            "PYTHONUNBUFFERED": "1",
            "PYTHONNOUSERSITE": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
            "TORCHELASTIC_ERROR_FILE": str(self.dir / "elastic-error.json"),
            **procs.harness_identity(),
        })
        # the framework's own temporary files (torchrun's torchelastic_*, compile caches) go inside the worker's
        # folder, so they leave with it even when a signal kills torchrun before it can clean up
        tmp = self.dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        short = _short_tmp(tmp)
        env.update({"TMPDIR": short, "TEMP": short, "TMP": short})
        owned = [d for d in _OWNED_DIRS if self.dir == d or d in self.dir.parents]
        env[procs.CLEANUP_DIR] = str(owned[0]) if owned else (str(self.dir) if self.own_dir else "")
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
            if self.world_size > 1:  # two ranks on two cores: one thread each, or they fight
                env["OMP_NUM_THREADS"] = "1"
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        # a reused directory (--keep) must not answer this worker's requests with an earlier worker's results
        for stale in [*self.dir.glob("req-*"), *self.dir.glob("res-*"), *self.dir.glob("ready.*")]:
            stale.unlink(missing_ok=True)
        self.next_request = 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.environment(), cwd=self.dir,
                                         start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(self)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _rank_results(self, i: int) -> dict[int, dict[str, Any]]:
        out = {}
        for r in range(self.world_size):
            p = result_path(self.dir, i, r)
            if p.exists():
                try:
                    out[r] = json.loads(p.read_text())
                except ValueError:  # being replaced right now: read it on the next poll
                    continue
        return out

    def _failure(self, results: dict[int, dict[str, Any]]) -> WorkerError:
        failed = {r: v for r, v in sorted(results.items()) if not v.get("ok")}
        if failed and all(v.get("unsupported") for v in failed.values()):  # a knob the release cannot take
            return UnsupportedError(str(next(iter(failed.values()))["unsupported"]), tail(self.log))
        what = "; ".join(f"rank {r}: {v.get('error')}" if self.world_size > 1 else str(v.get("error"))
                         for r, v in failed.items())
        return WorkerError(f"{self.adapter} worker failed: {what}", tail(self.log))

    def submit(self, request: dict[str, Any], timeout_s: float, timeout_field: str = "run.timeout_s"
               ) -> dict[str, Any]:
        """Send one request; wait until every rank has answered, one rank has failed, the worker died, or the
        timeout (named by `timeout_field` in the message) has passed."""
        if self.proc is None:
            self.start()
        i = self.next_request
        self.next_request += 1
        req = self.dir / f"req-{i:04d}.json"
        tmp = req.with_suffix(".tmp")
        tmp.write_text(json.dumps(request))
        os.replace(tmp, req)
        deadline = time.monotonic() + timeout_s
        while True:
            results = self._rank_results(i)
            if any(not v.get("ok") for v in results.values()):
                # give the other ranks a moment to report theirs too: every rank's failure reaches the verdict
                grace = time.monotonic() + 1.0
                while len(results) < self.world_size and time.monotonic() < grace and self.alive():
                    time.sleep(0.05)
                    results = self._rank_results(i)
                # a failed rank may leave the others blocked in a collective: the group cannot serve again
                self.kill()
                raise self._failure(results)
            if len(results) == self.world_size:
                return results[0]
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                results = self._rank_results(i)
                if any(not v.get("ok") for v in results.values()):
                    raise self._failure(results)
                missing = [r for r in range(self.world_size) if r not in results]
                ranks = f" (no answer from rank {', '.join(map(str, missing))})" if self.world_size > 1 else ""
                raise WorkerError(f"{self.adapter} worker exited with code {code} before finishing the run{ranks}",
                                  tail(self.log))
            if time.monotonic() > deadline:
                self.kill()
                who = "the reference" if self.role == "reference" else self.adapter
                missing = [r for r in range(self.world_size) if r not in results]
                ranks = f" (ranks {', '.join(map(str, missing))} never answered)" if self.world_size > 1 else ""
                raise WorkerError(f"{who} run timed out after {timeout_s:.0f} s{ranks} (hung or too slow); "
                                  f"raise {timeout_field} if it is only slow", tail(self.log))
            time.sleep(0.02)

    def kill(self) -> None:
        """Kill the worker's whole process tree (every rank) and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                procs.kill_tree(self.proc.pid)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        with _LIVE_LOCK:
            _LIVE.discard(self)
        _drop_short_tmp(self.dir / "tmp")

    def close(self) -> None:
        if self.alive():
            req = self.dir / f"req-{self.next_request:04d}.json"
            req.write_text(json.dumps({"shutdown": True}))
            try:
                assert self.proc is not None
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and exc_type is not WorkerError:
            self.kill()  # interrupted (signal) or a harness bug: no graceful 20 s shutdown
            if self.own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            return
        self.close()


SOCKET_SAFE_TMP = 40
"""Longest TMPDIR handed to a worker as is. Python's multiprocessing (datasets' map, the Manager OpenRLHF's data
path starts) puts AF_UNIX sockets at TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX, and a socket path over 107 bytes
fails (the Manager dies with EOFError): a deep worker folder gets a short symlink to its tmp folder instead."""


def _short_link(tmp: Path) -> Path:
    import hashlib

    return Path(tempfile.gettempdir()) / f"sd-{hashlib.sha1(str(tmp).encode()).hexdigest()[:10]}"


def _short_tmp(tmp: Path) -> str:
    """`tmp`, or a short symlink to it when its path is too long for the sockets made inside it."""
    tmp = tmp.resolve()
    if len(str(tmp)) <= SOCKET_SAFE_TMP:
        return str(tmp)
    link = _short_link(tmp)
    try:
        if link.is_symlink() and Path(os.readlink(link)) != tmp:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(tmp, target_is_directory=True)
    except OSError:
        return str(tmp)
    return str(link)


def _drop_short_tmp(tmp: Path) -> None:
    tmp = tmp.resolve()
    link = _short_link(tmp)
    try:
        if link.is_symlink() and Path(os.readlink(link)) == tmp:
            link.unlink()
    except OSError:
        pass


def host_python() -> str:
    return sys.executable
