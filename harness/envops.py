"""JIT-compiled framework ops built ahead of time, once per environment (e.g. DeepSpeed's CPU Adam: minutes of g++).

A framework that JIT-compiles an op at run time would otherwise compile it inside the first timed run of every new
environment (on a loaded 2-core machine this came within reach of the default 600 s timeout). The adapter declares
the ops (`Adapter.ops(version, spec)`); `ensure_ops` builds the missing ones in the environment's python with the
same TORCH_EXTENSIONS_DIR the workers get, printing progress, under the environment's build lock (concurrent
commands build each op once), and records each in `<env>/ops.json`. `stepdiff env build` builds every op an adapter
may need; a run builds those its spec needs before its worker starts. A failed build is reported and recorded but not
fatal: the run then compiles the op itself, and its own error, if any, becomes the run's error verdict.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

BUILD_TIMEOUT_S = 1800.0
PROGRESS_EVERY_S = 30.0
STALE_LOCK_S = 900.0
"""A torch extension build lock (`<extensions>/<op>/lock`, torch's FileBaton) older than this is left by a killed
build: a live holder is a worker checking its op (seconds) or a run compiling it itself (within its timeout, 600 s by
default), while builds here hold the environment's ops lock."""


class Op(Protocol):
    name: str
    code: str
    what: str


def extensions_dir(env_path: Path) -> Path:
    """Where an environment's JIT-compiled torch extensions live (one per environment: sharing a directory across
    environments makes each rebuild the other's ops)."""
    return env_path / "torch_extensions"


def _state(env_path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads((env_path / "ops.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def built(env_path: Path) -> dict[str, dict[str, object]]:
    """The ops recorded in an environment: name -> {"ok", "build_s", "error"}."""
    return _state(env_path)


def ensure_ops(env_path: Path, python: str, label: str, ops: tuple[Op, ...] | list[Op],
               log: bool = True) -> dict[str, float]:
    """Build the `ops` the environment does not have yet; returns {op name: build seconds} of those built now."""
    missing = [op for op in ops if not _state(env_path).get(op.name, {}).get("ok")]
    if not missing:
        return {}
    done: dict[str, float] = {}
    with open(env_path.parent / f".{env_path.name}.ops.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for op in missing:
            state = _state(env_path)  # another command may have built it while we waited for the lock
            if state.get(op.name, {}).get("ok"):
                continue
            for stale in clear_stale_locks(env_path):
                _say(f"stepdiff: removed a stale torch extension build lock {stale} (left by a killed build; every "
                     "later build would have waited on it forever)", log)
            ok, seconds, error = _build_one(env_path, python, label, op, log)
            state[op.name] = {"ok": ok, "build_s": round(seconds, 2), "error": error}
            tmp = env_path / "ops.json.tmp"
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, env_path / "ops.json")
            if ok:
                done[op.name] = seconds
    return done


def clear_stale_locks(env_path: Path, older_than_s: float = STALE_LOCK_S) -> list[Path]:
    """Remove the environment's torch extension build locks older than `older_than_s`; returns those removed.
    torch's FileBaton is a plain file that a killed process never removes, and its waiters poll for it forever."""
    removed = []
    now = time.time()
    for lock in extensions_dir(env_path).glob("*/lock"):
        try:
            if now - lock.stat().st_mtime > older_than_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # released meanwhile
            pass
    return removed


def _say(text: str, log: bool) -> None:
    if log:
        print(text, file=sys.stderr, flush=True)


def _build_one(env_path: Path, python: str, label: str, op: Op, log: bool) -> tuple[bool, float, str]:
    logfile = env_path / f"ops-{op.name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")}
    env.update({"TORCH_EXTENSIONS_DIR": str(extensions_dir(env_path)), "CUDA_VISIBLE_DEVICES": "",
                "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1"})
    _say(f"stepdiff: compiling {op.what} in {label} (once per environment; minutes on a small CPU) ...", log)
    t0 = time.perf_counter()
    with open(logfile, "wb") as out:
        proc = subprocess.Popen([python, "-c", op.code], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        next_note = t0 + PROGRESS_EVERY_S
        while proc.poll() is None:
            now = time.perf_counter()
            if now - t0 > BUILD_TIMEOUT_S:
                proc.kill()
                proc.wait()
                break
            if now >= next_note:
                _say(f"stepdiff:   ... still compiling {op.what} ({now - t0:.0f} s)", log)
                next_note += PROGRESS_EVERY_S
            time.sleep(0.5)
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        _say(f"stepdiff: compiled {op.what} in {seconds:.0f} s", log)
        return True, seconds, ""
    tail = logfile.read_text(errors="replace").strip().splitlines()[-1:] if logfile.exists() else []
    error = f"exit {proc.returncode}: {tail[0] if tail else 'no output'} (log: {logfile})"
    _say(f"stepdiff: warning: could not compile {op.what} ahead of time ({error}); the run will compile it "
         "itself", log)
    return False, seconds, error
