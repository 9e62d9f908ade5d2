"""Long-lived workers for one framework pin and the reference, serving many specs (fuzzing, properties).

A framework's import and distributed start-up are paid once per (adapter, world size), not once per example. Each
run is compared exactly as `stepdiff run` compares it: the reference's float32 run, its float64 calibration run, the
same bound, the same verdicts, so a configuration found here reproduces with `stepdiff run`.
"""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import envs
from .compare import RunResult, compare
from .errors import UnsupportedError, WorkerError
from .lanes import intra_op_threads
from .model import write_init_weights
from .pool import WorkerKey, WorkerPool
from .record import Record
from .refcache import ReferenceCache
from .registry import get_adapter
from .runner import FrameworkPin, _environment, worker_env
from .spec import Spec, to_dict
from .tolerance import Bound, CalibrationError, bound_from_dict, bound_to_dict
from .workers import make_run_dir, remove_run_dir


def spec_key(spec: Spec) -> str:
    """A canonical text of a spec (name and description excluded): equal keys run identically."""
    raw = to_dict(spec)
    raw["case"] = {"frameworks": raw["case"]["frameworks"]}
    return json.dumps(raw, sort_keys=True)


class Session:
    """Workers for `pin` (one per world size) and the host's reference, reused across specs until closed."""

    def __init__(self, pin: FrameworkPin, workdir: Path | None = None, cache: ReferenceCache | None = None) -> None:
        self.pin = pin
        self.own_dir = workdir is None
        # owned like a run directory: removed by a worker's watchdog if this process is killed, swept if left behind
        self.dir = make_run_dir("stepdiff-session-") if workdir is None else Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = _environment(pin)  # UsageError (one line) when it cannot be installed
        self.pool = WorkerPool(self.dir / "workers")
        """One worker per (adapter, world size); a crashed or timed-out one is replaced for the next spec."""
        self.cache = cache if cache is not None else ReferenceCache()
        """Reference results of specs seen before (Hypothesis replays and shrinks revisit specs)."""
        self.count = 0
        self._count_lock = threading.Lock()

    def unsupported(self, spec: Spec) -> str | None:
        reason: str | None = get_adapter(self.pin.name).unsupported(spec, self.pin.version)
        return reason

    def _key(self, name: str, python: str, world_size: int, device: str, extra: dict[str, str]) -> WorkerKey:
        # the reference (one rank) and the framework's ranks run at the same time: split the cores between them;
        # the reference's key is built with world_size 1, which leaves room for a one-rank framework beside it
        threads = intra_op_threads(1 + world_size)
        return WorkerKey(name, python, world_size, device, tuple(sorted({**threads, **extra}.items())),
                         "reference" if name == "reference" else "framework")

    def _next_dir(self, what: str) -> Path:
        with self._count_lock:  # the reference and the framework run from two threads
            self.count += 1
            return self.dir / f"{what}-{self.count}"

    def reference(self, spec: Spec, init: Path) -> tuple[Record, Bound]:
        """The reference record and the calibrated bound (as `stepdiff run`: float64 self-error x safety), from the
        reference cache when this spec was seen before."""
        from .runner import run_reference
        from .schedule import reference_material

        material = reference_material(spec)
        entry = self.cache.get(material)
        if entry is not None:
            return Record.load(entry.path), bound_from_dict(entry.values)
        host = envs.host_environment()
        key = self._key("reference", host.python, 1, spec.run.device, {})
        out = self._next_dir("ref")
        ref, bound, _ = run_reference(spec, init, out, submit=lambda req, t, f: self.pool.submit(key, req, t, f))
        self.cache.put(material, out / "reference" / "record", bound_to_dict(bound))
        shutil.rmtree(out, ignore_errors=True)
        return ref, bound

    def framework(self, spec: Spec, init: Path, keep: Path | None = None) -> Record:
        """The framework's record of `spec` (raises WorkerError on a crash, hang or failed run); left on disk at
        `keep` when given (the teacher-forced reference reads it)."""
        key = self._key(self.pin.name, self.env.python, spec.batch.world_size, spec.run.device, worker_env(self.env))
        out = keep or self._next_dir("fw")
        self.pool.submit(key, {"spec": to_dict(spec), "init": str(init), "out": str(out)}, spec.run.timeout_s)
        rec = Record.load(out)
        if keep is None:
            shutil.rmtree(out, ignore_errors=True)
        return rec

    def teacher(self, spec: Spec, init: Path, record_dir: Path) -> Record | None:
        """The reference replayed along the framework run's own parameters (later steps, as `stepdiff run`)."""
        from .runner import teacher_forced

        key = self._key("reference", envs.host_environment().python, 1, spec.run.device, {})
        out = self._next_dir("teacher")
        try:
            return teacher_forced(lambda req, t, f: self.pool.submit(key, req, t, f), spec, init, record_dir, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def run(self, spec: Spec) -> RunResult:
        """The framework against the reference, verdict as `stepdiff run` gives it."""
        from safetensors.torch import load_file

        reason = self.unsupported(spec)
        if reason:
            return RunResult(self.pin.name, self.pin.version, "unsupported", reason, extra_pins=self.pin.extra)
        init = write_init_weights(spec, envs.cache_root() / "init")
        fw_dir = self._next_dir("fw")
        # the reference and the framework run at the same time (two workers, two cores)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-reference") as ex:
            ref_future = ex.submit(self.reference, spec, init)
            try:
                rec: Record | None = self.framework(spec, init, keep=fw_dir)
                failure: WorkerError | None = None
            except WorkerError as e:
                rec, failure = None, e
            try:
                ref, bound = ref_future.result()
            except (WorkerError, CalibrationError) as e:
                shutil.rmtree(fw_dir, ignore_errors=True)
                message = e.message if isinstance(e, WorkerError) else str(e)
                failed = RunResult(self.pin.name, self.pin.version, "error", f"reference failed: {message}",
                                   extra_pins=self.pin.extra)
                failed.meta = {"reference_failed": True}  # the tester could not judge this spec: not the framework's
                return failed
        try:
            if failure is not None:
                raise failure
            assert rec is not None
            tref = self.teacher(spec, init, fw_dir)
            result = compare(spec, rec, ref, load_file(str(init)), bound, self.pin.name, self.pin.version, tref)
            result.meta = asdict(rec.meta)
        except UnsupportedError as e:
            result = RunResult(self.pin.name, self.pin.version, "unsupported", e.message, bound, log_tail=e.log_tail)
        except WorkerError as e:
            result = RunResult(self.pin.name, self.pin.version, "error", e.message, bound, log_tail=e.log_tail)
        finally:
            shutil.rmtree(fw_dir, ignore_errors=True)
        result.extra_pins = self.pin.extra
        result.env_versions = self.env.versions
        return result

    def init_tensors(self, spec: Spec) -> dict[str, Any]:
        from safetensors.torch import load_file

        return dict(load_file(str(write_init_weights(spec, envs.cache_root() / "init"))))

    def close(self) -> None:
        self.pool.close()
        if self.own_dir:
            remove_run_dir(self.dir)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
