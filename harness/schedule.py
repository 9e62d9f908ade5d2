"""Running cases with parallel, reused workers and cached reference results.

What a tiny-model case costs is almost all process start-up and imports (seconds per framework), not the step
(milliseconds). So:
- every worker key (adapter, environment, world size, device; the reference is one more) gets a *lane*: one thread
  that feeds that key's one pooled worker its requests in order, for every case of the command;
- lanes run concurrently, at most `jobs` cores' worth at a time (a world-size-2 worker counts two), so the reference
  and the framework workers of a case start and run at the same time instead of one after the other;
- workers start (imports, distributed init) right away, while the harness writes the initial weights;
- the reference record and its float64 self-error come from the reference cache when the spec is unchanged
  (stepdiff.harness.refcache), and the reference worker is then not even started;
- each framework run is compared as soon as its record and its case's reference exist; cases finish, and are
  reported, in the order given.

The lanes, cores and worker keys are stepdiff.harness.lanes; the reference results `References`; the token-level
fits of diverging SFT runs stepdiff.harness.token_fits.

A task never holds a core while it waits for another task, so lanes cannot deadlock. A failure stays with its run:
a crashed, failed or timed-out worker is replaced for the next case (stepdiff.harness.pool).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import envs, progress
from .compare import RunResult, compare
from .errors import UnsupportedError, WorkerError
from .lanes import FRAMEWORK, REFERENCE_FIRST, Lanes, reference_timeout
from .pool import WorkerKey, WorkerPool
from .record import Record
from .refcache import Entry, ReferenceCache, key_material
from .registry import get_adapter
from .safepath import component
from .spec import Spec, to_dict
from .token_fits import TokenFits
from .tolerance import Bound, CalibrationError, bound_for, bound_from_dict, bound_to_dict


@dataclass
class _Ref:
    record: Record | None
    bound: Bound
    versions: dict[str, str]
    error: str | None = None
    log_tail: str = ""
    cached: bool = False
    dir: Path | None = None


@dataclass
class _Case:
    index: int
    spec: Spec
    pins: list[Any]
    wd: Path
    unsupported: dict[Any, str | None]
    init: Path | None = None
    init_ready: threading.Event = field(default_factory=threading.Event)
    """Set once the main thread has written the case's initial weights (`init`)."""
    cached: Entry | None = None
    """The case's verified reference-cache entry (looked up once, before any worker starts)."""
    ref: Future[_Ref] | None = None
    runs: list[Future[RunResult]] = field(default_factory=list)


def start_worker(lanes: Lanes, key: WorkerKey, timeout: float, case: _Case) -> None:
    """Inside a job's core: start the key's worker if it is not running, then wait for the case's initial weights."""
    lanes.start(key, timeout)
    case.init_ready.wait()
    if case.init is None:
        raise RuntimeError("the initial weights were not written")


class References:
    """A command's reference results: each case's reference record and bound (from the reference cache, or computed
    on the pooled reference worker and cached in the background), the reference worker warmed for a cached multi-step
    case, and the teacher-forced replays along a framework run's own parameters."""

    def __init__(self, lanes: Lanes, cache: ReferenceCache) -> None:
        self.lanes = lanes
        self.cache = cache
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refcache")

    def close(self, cancel: bool = False) -> None:
        self._writer.shutdown(wait=True, cancel_futures=cancel)  # before the run directory is removed

    def record(self, case: _Case) -> _Ref:
        """The case's reference record and bound: from the cache, or computed on the pooled reference worker
        (stepdiff.harness.runner.run_reference: float32 run, float64 calibration) and then cached."""
        from .runner import run_reference

        spec = case.spec
        host = envs.host_environment()
        if case.cached is not None:
            try:
                rec = Record.load(case.cached.path)
                bound = bound_from_dict(case.cached.values)
                return _Ref(rec, bound, host.versions, cached=True, dir=case.cached.path)
            except Exception as e:  # unreadable despite its checksums: recompute
                self.lanes.say(f"stepdiff: cached reference could not be read ({type(e).__name__}: {e}); recomputing")
        key = self.lanes.reference_key(spec.run.device)

        def submit(request: dict[str, Any], timeout_s: float, field: str) -> Any:
            self.lanes.trace(f"reference {spec.case.name}: request {request.get('options') or ''}")
            return self.lanes.pool.submit(key, request, timeout_s, field)

        try:
            with self.lanes.cores.hold(1, REFERENCE_FIRST):
                start_worker(self.lanes, key, float(spec.run.reference_timeout_s), case)
                rec, bound, versions = run_reference(spec, case.init or Path(), case.wd, submit=submit)
            self.lanes.trace(f"reference {spec.case.name}: done")
        except WorkerError as e:
            return _Ref(None, bound_for(spec.model.dtype, None), host.versions, error=e.message, log_tail=e.log_tail)
        except CalibrationError as e:
            return _Ref(None, bound_for(spec.model.dtype, None), host.versions, error=str(e))
        # stored in the background: hashing and copying a large record must not delay the comparisons
        self._writer.submit(self.cache.put, reference_material(spec), case.wd / "reference" / "record",
                            bound_to_dict(bound))
        return _Ref(rec, bound, versions, dir=case.wd / "reference" / "record")

    def warm(self, case: _Case) -> None:
        """A cached reference still needs its worker for the teacher-forced replay of later steps (along each
        framework's own parameters, never cached): started now, beside the framework workers, instead of after the
        framework's record is in (profiled: a cached 2-step TRL run took 49 s against 25 s uncached, 24 s of it the
        reference worker's start-up after the record). A failure here is left to the replay, which reports it."""
        key = self.lanes.reference_key(case.spec.run.device)
        try:
            with self.lanes.cores.hold(1, REFERENCE_FIRST):
                start_worker(self.lanes, key, float(case.spec.run.reference_timeout_s), case)
        except (WorkerError, RuntimeError):
            pass

    def teacher(self, spec: Spec, init: Path, record_dir: Path, out: Path) -> Record | None:
        """The reference replayed along a framework run's own parameters (runner.teacher_forced), on the pooled
        reference worker: a task of the reference's lane, holding one core."""
        from .runner import teacher_forced

        key = self.lanes.reference_key(spec.run.device)
        timeout, field_name = reference_timeout(spec)

        def submit(request: dict[str, Any], timeout_s: float, field: str) -> Any:
            return self.lanes.pool.submit(key, request, timeout, *field_name)

        with self.lanes.cores.hold(1):
            return teacher_forced(submit, spec, init, record_dir, out)


class Scheduler:
    """One command's worth of cases: its lanes (stepdiff.harness.lanes), its reference results (`References`), its
    framework runs and their comparisons, its token-level fits (stepdiff.harness.token_fits)."""

    def __init__(self, pool: WorkerPool, jobs: int | None = None, cache: ReferenceCache | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.lanes = Lanes(pool, jobs, log)
        self.pool = pool
        self.cores = self.lanes.cores
        self.cache = cache if cache is not None else ReferenceCache()
        self.log = log
        """Extra one-line records (the progress display, stepdiff.harness.progress, reports every run anyway)."""
        self.refs = References(self.lanes, self.cache)
        self.tokens = TokenFits(self.lanes, self.cache)
        self.multi = False

    def close(self, cancel: bool = False) -> None:
        self.lanes.close(cancel)
        self.refs.close(cancel)

    # -- the reference ---------------------------------------------------------------------------------------

    def _reference(self, case: _Case) -> _Ref:
        label = f"reference [{case.spec.case.name}]" if self.multi else "reference"
        with progress.task(label, "running (and its float64 calibration)", announce=case.cached is None) as t:
            ref = self.refs.record(case)
            if ref.record is None:
                t.done(f"failed: {ref.error}")
            else:
                how = "from the cache" if ref.cached else f"done ({t.elapsed:.1f} s)"
                t.done(f"{how}; bound {ref.bound.value:.1e}")
        return ref

    # -- a framework run -------------------------------------------------------------------------------------

    def _framework(self, case: _Case, pin: Any, env: envs.Environment) -> RunResult:
        label = f"{pin.label} [{case.spec.case.name}]" if self.multi else pin.label
        with progress.task(label, "running") as t:
            result = self._framework_run(case, pin, env)
            t.done(f"{result.verdict} ({result.timings['wall_s']:.1f} s"
                   f"{', new worker' if result.timings.get('fresh_worker') else ''})")
        if self.log is not None:
            self.lanes.say(f"stepdiff: {label}: {result.verdict} ({result.timings['wall_s']:.1f} s)")
        return result

    def _framework_run(self, case: _Case, pin: Any, env: envs.Environment) -> RunResult:
        from .runner import _dirname, _meta_dict

        spec = case.spec
        name, version = pin.name, pin.version
        wdir = case.wd / _dirname(pin.label)
        key = self.lanes.framework_key(pin, env, spec)
        t0 = time.perf_counter()
        fresh = self.pool.fresh(key)
        rec: Record | None = None
        failure: WorkerError | None = None
        t_run = t0
        try:
            with self.cores.hold(spec.batch.world_size, FRAMEWORK):
                t_run = time.perf_counter()
                start_worker(self.lanes, key, spec.run.timeout_s, case)
                self.lanes.trace(f"{pin.label} {spec.case.name}: request")
                self.pool.submit(key, {"spec": to_dict(spec), "init": str(case.init), "out": str(wdir / "record")},
                                 spec.run.timeout_s)
            rec = Record.load(wdir / "record")
        except WorkerError as e:
            failure = e
        run_s = time.perf_counter() - t0
        self.lanes.trace(f"{pin.label} {spec.case.name}: record in")
        assert case.ref is not None
        ref = case.ref.result()
        if isinstance(failure, UnsupportedError):  # the release cannot take a knob: reported with its reason
            result = RunResult(name, version, "unsupported", failure.message, ref.bound, log_tail=failure.log_tail)
        elif failure is not None:
            result = RunResult(name, version, "error", failure.message, ref.bound, log_tail=failure.log_tail)
        elif ref.record is None:
            result = RunResult(name, version, "error", f"reference failed: {ref.error}", log_tail=ref.log_tail)
        else:
            assert rec is not None
            # imported only now: the main thread imports torch while the workers start, and an import here (it
            # pulls in torch) would wait on that import's lock, delaying this worker's start by seconds
            from safetensors.torch import load_file

            try:
                tref = None
                if spec.batch.steps > 1:  # later steps at the framework's own parameters (on the reference's lane)
                    lane = self.lanes.lane(self.lanes.reference_key(spec.run.device))
                    tref = lane.submit(self.refs.teacher, spec, case.init or Path(), wdir / "record",
                                       wdir / "teacher").result()
                result = compare(spec, rec, ref.record, load_file(str(case.init)), ref.bound, name, version, tref)
                result.meta = _meta_dict(rec)
            except WorkerError as e:
                result = RunResult(name, version, "error", e.message, ref.bound, log_tail=e.log_tail)
        result.extra_pins = pin.extra
        result.env_versions = env.versions
        result.timings = {"wall_s": time.perf_counter() - t0, "run_s": run_s,
                          "queue_s": t_run - t0,
                          "env_build_s": 0.0 if env.cached else env.build_s, "fresh_worker": float(fresh)}
        self.lanes.trace(f"{pin.label} {spec.case.name}: compared")
        return result

    # -- a whole command -------------------------------------------------------------------------------------

    def run(self, cases: list[tuple[Spec, list[Any]]], workdir: Path,
            on_result: Callable[[Any], None] | None = None) -> list[Any]:
        """Run every case; results in the given order (`on_result` is called with each as soon as it and every case
        before it are done)."""
        from .model import write_init_weights
        from .runner import CaseResult, _environment, _pairwise

        t_start = time.perf_counter()
        self.lanes.trace("scheduler start")
        self.multi = len(cases) > 1
        prepared: list[_Case] = []
        environments: dict[Any, envs.Environment] = {}
        names: dict[str, int] = {}
        for i, (spec, pins) in enumerate(cases):
            unsupported = {p: get_adapter(p.name).unsupported(spec, p.version) for p in pins}
            for p in pins:  # every environment up front: a bad pin is a usage error, early
                if unsupported[p] is None:
                    if p not in environments:
                        with progress.task(p.label, "environment", announce=False) as t:
                            environments[p] = _environment(p)
                            t.done("environment ready", record=False)
                    _ensure_ops(p, environments[p], spec)
            n = names[spec.case.name] = names.get(spec.case.name, 0) + 1
            wd = workdir / component(spec.case.name if n == 1 else f"{spec.case.name}-{n}")
            prepared.append(_Case(i, spec, pins, wd, unsupported))

        # every job is queued now: each starts its worker as soon as it gets a core, while the harness writes the
        # initial weights (and loads torch); a job holds its core from its worker's start to its record
        need_ref = [c for c in prepared if any(v is None for v in c.unsupported.values())]
        for c in need_ref:
            c.cached = self.cache.get(reference_material(c.spec))
            c.wd.mkdir(parents=True, exist_ok=True)
            ref_lane = self.lanes.lane(self.lanes.reference_key(c.spec.run.device))
            c.ref = ref_lane.submit(self._reference, c)
            if c.cached is not None and c.spec.batch.steps > 1:
                ref_lane.submit(self.refs.warm, c)
            for p in c.pins:
                if c.unsupported[p] is None:
                    env = environments[p]
                    lane = self.lanes.lane(self.lanes.framework_key(p, env, c.spec))
                    c.runs.append(lane.submit(self._framework, c, p, env))
        for c in need_ref:
            try:
                c.init = write_init_weights(c.spec, envs.cache_root() / "init")
            finally:
                c.init_ready.set()  # (a failure here fails the command; waiting jobs then see no init and stop)
            self.lanes.trace(f"init weights of {c.spec.case.name}")
        results = []
        t_prev = t_start
        for c in prepared:
            spec = c.spec
            if c.ref is None:  # nothing to compare: no reference run either
                runs = [RunResult(p.name, p.version, "unsupported", str(c.unsupported[p]), extra_pins=p.extra)
                        for p in c.pins]
                for r in runs:
                    progress.log(f"{r.label}: unsupported")
                result = CaseResult(spec.case.name, spec, runs, bound_for(spec.model.dtype, None,
                                                                          spec.run.rel_tolerance))
            else:
                done = iter(f.result() for f in c.runs)
                runs = [next(done) if c.unsupported[p] is None else
                        RunResult(p.name, p.version, "unsupported", str(c.unsupported[p]), extra_pins=p.extra)
                        for p in c.pins]
                ref = c.ref.result()
                if ref.record is not None:
                    assert c.init is not None
                    with progress.task("signatures", "token-level fits", announce=False) as t:
                        self.tokens.fit(spec, runs, c.init, c.wd)
                        t.done("done", record=False)
                result = CaseResult(spec.case.name, spec, runs, ref.bound, ref.versions)
                if ref.record is not None:
                    _pairwise(result, c.wd)
                result.reference_cached = ref.cached
            now = time.perf_counter()
            result.elapsed_s = now - t_prev  # the wall time this case added (cases overlap)
            t_prev = now
            results.append(result)
            self.lanes.trace(f"case {spec.case.name} finished")
            if on_result is not None:
                on_result(result)
        return results


def reference_material(spec: Spec) -> dict[str, Any]:
    """The reference-cache key material of a case's reference (record + calibrated bound): the spec plus what
    run_reference decides from the machine and the harness's settings (sketched contributions, calibration layers)."""
    import math

    from .model import parameter_shapes
    from .runner import calibration_spec
    from .sketch import fraction_for

    n_params = sum(math.prod(s) for s in parameter_shapes(spec).values())
    calibrate = spec.model.dtype != "float64"
    options: dict[str, Any] = {"calibrate": calibrate,
                               "contrib_sketch": fraction_for(n_params, spec.batch.world_size * spec.batch.grad_accum)}
    if calibrate:
        cal, _ = calibration_spec(spec, n_params)
        options["calibration_layers"] = None if cal is spec else cal.model.num_layers
    return key_material(spec, options)


def _ensure_ops(pin: Any, env: envs.Environment, spec: Spec) -> None:
    """JIT-compiled ops the run would compile, built before its worker starts (outside its timeout)."""
    if getattr(get_adapter(pin.name), "host_env", False):
        return
    from .envops import ensure_ops

    ops = get_adapter(pin.name).ops(pin.version, spec)
    if ops:
        ensure_ops(env.path, env.python, env.name, ops)


def run_cases(cases: list[tuple[Spec, list[Any]]], workdir: Path | None = None, pool: WorkerPool | None = None,
              jobs: int | None = None, cache: ReferenceCache | None = None,
              log: Callable[[str], None] | None = None, on_result: Callable[[Any], None] | None = None) -> list[Any]:
    """Run cases (spec, framework pins) with parallel lanes and pooled workers; see the module docstring. Records
    and worker logs go under `workdir` (kept) or a temporary directory (removed)."""
    from .errors import Interrupted
    from .pool import current_pool
    from .workers import make_run_dir, remove_run_dir

    own_dir = workdir is None
    wd = make_run_dir() if workdir is None else Path(workdir)
    pool = pool if pool is not None else current_pool()
    own_pool = pool is None
    p = pool if pool is not None else WorkerPool(wd / "workers")
    sched = Scheduler(p, jobs, cache, log)
    failed = True
    where = f"case {cases[0][0].case.name}" if len(cases) == 1 else f"{len(cases)} cases"
    try:
        results = sched.run(cases, wd, on_result)
        failed = False
        return results
    except Interrupted as e:
        e.where = e.where or where
        raise
    except KeyboardInterrupt:  # SIGINT where stepdiff's own handlers are not installed (a library caller)
        raise Interrupted(2, where) from None
    finally:
        if failed:  # interrupted or a harness bug: stop the workers now, drop queued work (a shared pool lives on)
            p.abort(close=own_pool)
        sched.close(cancel=failed)
        if own_pool:
            p.close()
        if own_dir:
            remove_run_dir(wd)
