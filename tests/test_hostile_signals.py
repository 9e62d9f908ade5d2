"""Signals and the parent's death: SIGTERM, SIGINT and SIGKILL to `stepdiff run` stop every worker (every rank),
remove the temporary run directory and (where stepdiff survives to say it) exit promptly with one line saying what
was interrupted. Uses the `faults` adapter's hang mode, so the signal always lands while a framework run is going on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepdiff.harness import procs


def start_hanging_run(tmp_path: Path, world_size: int) -> tuple[subprocess.Popen[str], Path]:
    case = tmp_path / "hang.toml"
    case.write_text(f'[case]\nname = "signal-hang"\nframeworks = ["faults"]\n[batch]\nworld_size = {world_size}\n'
                    '[run]\ntimeout_s = 600\n[faults]\nmode = "hang"\n')
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "stepdiff", "run", str(case)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    return proc, tmp


def wait_for_hang(proc: subprocess.Popen[str], tmp: Path, world_size: int, limit_s: float = 300) -> list[int]:
    """Wait until every rank of the faults worker hangs; return the worker's process tree (pids)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        logs = list(tmp.glob("stepdiff-run-*/workers/faults-*/worker.log"))  # the run's pooled faults worker
        if logs and logs[0].read_text(errors="replace").count("faults: simulated hang") >= world_size:
            return procs.descendants(proc.pid)
        time.sleep(0.2)
    raise AssertionError("the faults worker never reached its hang")


def gone(pids: list[int], within_s: float) -> list[int]:
    """The pids still alive after `within_s` (zombies count as gone)."""
    deadline = time.monotonic() + within_s
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if procs.start_time(p) is not None]
        if not alive:
            break
        time.sleep(0.1)
    return alive


@pytest.mark.parametrize(("sig", "world_size", "code"), [(signal.SIGTERM, 2, 143), (signal.SIGINT, 1, 130)],
                         ids=["SIGTERM-ws2", "SIGINT-ws1"])
def test_signal_stops_every_worker_removes_temp_and_exits_promptly(tmp_path: Path, sig: int, world_size: int,
                                                                    code: int) -> None:
    proc, tmp = start_hanging_run(tmp_path, world_size)
    try:
        tree = wait_for_hang(proc, tmp, world_size)
        assert len(tree) >= world_size  # torchrun + its ranks, or the one worker
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert took < 10, f"took {took:.1f} s to stop"
    line = err.strip().splitlines()[-1]
    name = signal.Signals(sig).name
    assert line.startswith(f"stepdiff: interrupted by {name} during case signal-hang: no verdict; every worker "
                           "stopped"), err
    assert "Traceback" not in err
    assert gone(tree, 5) == [], "workers survived the signal"
    left = [p.name for p in tmp.iterdir() if p.name.startswith(("stepdiff-", "torchelastic_", "sd-"))]
    assert left == [], f"temporary directories left behind: {left}"


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["ws1", "ws2"])
def test_sigkill_of_stepdiff_workers_stop_themselves_and_clean_up(tmp_path: Path, world_size: int) -> None:
    """stepdiff cannot react to SIGKILL: its workers notice (watchdog) and stop themselves, removing the run dir."""
    proc, tmp = start_hanging_run(tmp_path, world_size)
    try:
        tree = wait_for_hang(proc, tmp, world_size)
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert gone(tree, 3) == [], "workers (or torchrun) outlived a killed stepdiff"
    deadline = time.monotonic() + 10
    while list(tmp.glob("stepdiff-run-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    while [p for p in tmp.iterdir() if p.name.startswith("sd-")] and time.monotonic() < deadline:
        time.sleep(0.1)
    # sd-*: the short TMPDIR symlinks of the workers (their watchdogs remove them with the run dir)
    left = [p.name for p in tmp.iterdir() if p.name.startswith(("stepdiff-", "torchelastic_", "sd-"))]
    assert left == [], f"a killed stepdiff left temporary directories behind: {left}"


def test_a_watchdog_removes_only_its_own_dangling_short_tmp_link(tmp_path: Path) -> None:
    target = tmp_path / "worker" / "tmp"
    target.mkdir(parents=True)
    link, other = tmp_path / "sd-0123456789", tmp_path / "not-ours"
    link.symlink_to(target, target_is_directory=True)
    other.symlink_to(tmp_path / "gone")
    procs.drop_dangling_tmp_link(str(link))
    assert link.is_symlink()  # its worker folder is still there: kept
    procs.drop_dangling_tmp_link(str(other))
    assert other.is_symlink()  # not a short TMPDIR link of stepdiff: never touched
    target.rmdir()
    procs.drop_dangling_tmp_link(str(link))
    assert not link.is_symlink()
