"""Launching and talking to worker processes (the harness side of worker_main's file protocol).

A worker is one process (world size 1) or a torchrun group (world size > 1) running an adapter inside an
environment's python. The harness enforces a timeout, captures stdout/stderr to a log, and turns a crash, a hang or an
exception into a WorkerError carrying the tail of the framework's own output. Never a pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stepdiff._util import free_port

from .errors import WorkerError

PACKAGES = ("stepdiff", "stepdiff.harness", "stepdiff.adapters", "stepdiff.reports")


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


class Worker:
    """One adapter in one environment, serving requests until closed."""

    def __init__(self, adapter: str, python: str, world_size: int = 1, device: str = "cpu",
                 env: dict[str, str] | None = None, workdir: Path | None = None) -> None:
        self.adapter, self.python, self.world_size, self.device = adapter, python, world_size, device
        self.extra_env = dict(env or {})
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"stepdiff-{adapter}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.next_request = 0

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
        })
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

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def submit(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one request; wait for its result, the worker's death, or the timeout."""
        if self.proc is None:
            self.start()
        i = self.next_request
        self.next_request += 1
        req, res = self.dir / f"req-{i:04d}.json", self.dir / f"res-{i:04d}.json"
        tmp = req.with_suffix(".tmp")
        tmp.write_text(json.dumps(request))
        os.replace(tmp, req)
        deadline = time.monotonic() + timeout_s
        while True:
            if res.exists():
                result = json.loads(res.read_text())
                if not result.get("ok"):
                    # a failed rank may leave the others blocked in a collective: the group cannot serve again
                    self.kill()
                    raise WorkerError(f"{self.adapter} worker failed: {result.get('error')}", tail(self.log))
                return result
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise WorkerError(f"{self.adapter} worker exited with code {code} before finishing the run",
                                  tail(self.log))
            if time.monotonic() > deadline:
                self.kill()
                raise WorkerError(f"{self.adapter} run timed out after {timeout_s:.0f} s (hung or too slow); "
                                  "raise run.timeout_s if it is only slow", tail(self.log))
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

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

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def host_python() -> str:
    return sys.executable
