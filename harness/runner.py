"""Running a case: initial weights, the reference (and its float64 calibration), each framework in its own
environment and worker, and the comparisons. Returns a CaseResult; reports render it elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import envs, outcome, pins
from .calibration import calibrate as calibrate_bound
from .compare import RunResult
from .diff import dict_diff
from .errors import UsageError
from .model import parameter_shapes, write_init_weights
from .pins import FrameworkPin
from .record import Record
from .registry import adapter_names, get_adapter
from .safepath import component
from .spec import Spec, to_dict
from .tolerance import Bound, bound_for
from .workers import Worker

EXIT_AGREE, EXIT_DIVERGE, EXIT_ERROR, EXIT_USAGE, EXIT_UNSUPPORTED = (
    outcome.EXIT_AGREE, outcome.EXIT_DIVERGE, outcome.EXIT_ERROR, outcome.EXIT_USAGE, outcome.EXIT_UNSUPPORTED)
__all__ = ["CaseResult", "FrameworkPin", "parse_pin", "run_case", "run_reference", "worker_env"]


@dataclass
class CaseResult:
    case: str
    spec: Spec
    runs: list[RunResult]
    bound: Bound
    reference_versions: dict[str, str] = field(default_factory=dict)
    pairwise: dict[str, dict[str, float]] = field(default_factory=dict)
    """Max gradient rel error between every two framework runs (symmetric)."""
    odd_one_out: str | None = None
    same_numbers: list[list[str]] = field(default_factory=list)
    """Framework runs grouped by agreeing with each other within the bound."""
    elapsed_s: float = 0.0
    reference_cached: bool = False
    """The reference record and its float64 self-error came from the reference cache (stepdiff.harness.refcache)."""

    @property
    def verdict(self) -> str:
        """error > diverge > unsupported > agree over the runs (stepdiff.harness.outcome)."""
        return outcome.worst_verdict(r.verdict for r in self.runs)

    @property
    def exit_code(self) -> int:
        return outcome.exit_code(r.verdict for r in self.runs)


def parse_pin(pin: str, where: str = "--framework") -> FrameworkPin:
    """'trl==1.16.0,deepspeed==0.18.9' -> FrameworkPin('trl', '1.16.0', ('deepspeed==0.18.9',)).

    The first pin names the adapter; the others pin more packages of the same environment (a version set). A bare
    name means the newest release. Every piece is a PEP 508 name + specifier, nothing else (stepdiff.harness.pins).
    """
    return pins.parse(pin, adapter_names(), where)


def worker_env(env: envs.Environment) -> dict[str, str]:
    """Variables a worker in `env` needs: JIT-compiled framework ops are cached per environment (sharing one
    directory across environments makes each rebuild the other's ops)."""
    return {"TORCH_EXTENSIONS_DIR": str(env.path / "torch_extensions")}


Submit = Callable[[dict[str, Any], float, str], Any]
"""Sends one request to a reference worker and waits for it, with a timeout and the spec field that sets it
(Worker.submit, or a pooled worker's)."""


def reference_record(submit: Submit, spec: Spec, init: Path, out: Path, **options: Any) -> Record:
    """One reference run through `submit` (options: dtype, teacher, token_step, contributions, contrib_sketch)."""
    submit({"spec": to_dict(spec), "init": str(init), "out": str(out), "options": options},
           spec.run.reference_timeout_s, "run.reference_timeout_s")
    return Record.load(out)


def run_reference(spec: Spec, init: Path, workdir: Path, calibrate: bool = True,
                  submit: Submit | None = None) -> tuple[Record, Bound, dict[str, str]]:
    """The reference record and the bounds calibrated from the reference's own errors against its float64 run,
    teacher forced along the reference's own trajectory (harness.calibration: gradients in total and per parameter,
    micro-batch weights, updates and optimizer state).

    Real-size models: per-micro-batch contributions are kept as sketches when full copies would not fit
    (harness/sketch.py), and the float64 calibration runs on the same shape with fewer layers when a float64 copy
    of the full model would not fit the device; the bound's source says so. `submit` sends the requests to an
    existing (pooled) reference worker; without it a worker is started for this call."""
    if submit is None:
        host = envs.host_environment()
        with Worker("reference", host.python, 1, spec.run.device, workdir=workdir / "reference",
                    role="reference") as w:
            return run_reference(spec, init, workdir, calibrate, w.submit)
    from safetensors.torch import load_file

    from .sketch import fraction_for

    host = envs.host_environment()
    rdir = workdir / "reference"
    n_params = sum(math.prod(s) for s in parameter_shapes(spec).values())
    fraction = fraction_for(n_params, spec.batch.world_size * spec.batch.grad_accum)
    ref = reference_record(submit, spec, init, rdir / "record", **({"contrib_sketch": fraction} if fraction else {}))
    if not calibrate or spec.model.dtype == "float64":
        return ref, bound_for(spec.model.dtype, None, spec.run.rel_tolerance,
                              update_override=spec.run.update_tolerance), host.versions
    cal, note = calibration_spec(spec, n_params)
    work, work_dir, cal_init = ref, rdir / "record", init
    if cal is not spec:  # the same shape with fewer layers, in the working precision too
        cal_init = write_init_weights(cal, envs.cache_root() / "init")
        work_dir = rdir / "record-cal"
        work = reference_record(submit, cal, cal_init, work_dir, contributions=False)
    # float64 contributions (for the micro-batch weight calibration) only where the working run keeps full ones
    ref64 = reference_record(submit, cal, cal_init, rdir / "record64", dtype="float64", teacher=str(work_dir),
                             contributions=cal is spec and not fraction)
    bound = calibrate_bound(cal, work, ref64, load_file(str(cal_init)))
    if note:
        bound = replace(bound, source=f"{bound.source}; {note}")
    return ref, bound, host.versions


def teacher_forced(submit: Submit, spec: Spec, init: Path, record_dir: Path, out: Path) -> Record | None:
    """The reference replayed along a framework's own parameters: step s >= 1 from the parameters the framework had
    before it (None for one step: step 0 starts from the initial weights for everyone)."""
    from .sketch import fraction_for

    if spec.batch.steps == 1:
        return None
    n_params = sum(math.prod(s) for s in parameter_shapes(spec).values())
    fraction = fraction_for(n_params, spec.batch.world_size * spec.batch.grad_accum)
    return reference_record(submit, spec, init, out, teacher=str(record_dir),
                            **({"contrib_sketch": fraction} if fraction else {}))


FP64_BUDGET_ENV = "STEPDIFF_FP64_BUDGET_GB"


def fp64_budget_bytes(device: str) -> float:
    """Memory a float64 reference run may take: STEPDIFF_FP64_BUDGET_GB, else 80 % of the GPU's free memory
    (nvidia-smi: the harness never initialises CUDA itself) or half the host's RAM."""
    import os
    import subprocess

    if os.environ.get(FP64_BUDGET_ENV):
        return float(os.environ[FP64_BUDGET_ENV]) * 2**30
    if device == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            return 0.8 * float(out[0]) * 2**20
        except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
            pass
    return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibration_spec(spec: Spec, n_params: int) -> tuple[Spec, str]:
    """The spec the float64 calibration runs on: the spec itself when a float64 copy fits, else the same shape
    family (hidden size, heads, MLP width, vocabulary and data unchanged: the reductions whose rounding the bound
    measures) with the fewest layers that fit, down to one."""
    from .model import shape_of

    per_param = 8 * (4 + (2 if spec.optimizer.name == "adamw" else 0))  # params, grads, step sum, copy; Adam state
    budget = fp64_budget_bytes(spec.run.device)
    if n_params * per_param <= budget:
        return spec, ""
    shape = shape_of(spec.model)
    per_layer = sum(math.prod(s) for n, s in parameter_shapes(spec).items() if n.startswith("model.layers.0."))
    fixed = n_params - per_layer * shape["num_layers"]
    layers = max(1, min(shape["num_layers"] - 1, int((budget / per_param - fixed) // max(per_layer, 1))))
    small = spec.replace(model__preset="tiny", model__vocab_size=shape["vocab_size"],
                         model__hidden_size=shape["hidden_size"], model__intermediate_size=shape["intermediate_size"],
                         model__num_heads=shape["num_heads"], model__num_kv_heads=shape["num_kv_heads"],
                         model__num_layers=layers)
    return small, (f"float64 calibration on the same shape with {layers} of {shape['num_layers']} layers (a float64 "
                   f"copy of the full model needs ~{n_params * per_param / 2**30:.0f} GiB, over the "
                   f"{budget / 2**30:.0f} GiB budget)")


def _environment(pin: FrameworkPin) -> envs.Environment:
    if getattr(get_adapter(pin.name), "host_env", False):  # self-test adapters run in the host's python
        return envs.host_environment()
    return envs.ensure(envs.request_for(pin.name, pin.version, pin.extra))


def _dirname(label: str) -> str:
    """A run's directory name from its label: one safe path component, never a way out of the run directory."""
    return component(label.replace("==", "-").replace(",", "+"))


def _meta_dict(rec: Record) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(rec.meta)


def run_case(spec: Spec, frameworks: list[FrameworkPin] | list[str], workdir: Path | None = None,
             log: Callable[[str], None] | None = None, pool: Any = None, jobs: int | None = None,
             cache: Any = None) -> CaseResult:
    """One case: the reference and every framework run concurrently in pooled workers (stepdiff.harness.schedule);
    `pool` (a WorkerPool) keeps the workers for later cases, `cache` (a ReferenceCache) reuses reference results."""
    from .schedule import run_cases

    if not frameworks:
        raise UsageError("no frameworks to run: give --framework NAME==VERSION or list them in case.frameworks")
    pins = [parse_pin(f) if isinstance(f, str) else f for f in frameworks]
    return run_cases([(spec, pins)], workdir=workdir, pool=pool, jobs=jobs, cache=cache, log=log)[0]


TOKEN_FIT_MAX_FLOATS = 2e8
"""Per-token contributions are (target tokens x parameters) floats: done for tiny models only (the token fit runs in
stepdiff.harness.schedule)."""


def _pairwise(result: CaseResult, wd: Path) -> None:
    """Every framework run against every other; with three or more, name the one that disagrees with the rest."""
    ok = [r for r in result.runs if r.verdict in ("agree", "diverge")]
    records = {}
    for r in ok:
        d = wd / _dirname(r.label) / "record"
        if d.exists():
            records[r.label] = Record.load(d)
    labels = list(records)
    for a in labels:
        result.pairwise[a] = {}
        for b in labels:
            if a != b:
                result.pairwise[a][b] = max(dict_diff(x.grads, y.grads).total.rel
                                            for x, y in zip(records[a].steps, records[b].steps, strict=True))
    name_groups(result)


def name_groups(result: CaseResult) -> None:
    """From the pairwise errors: which runs produce the same numbers, and the odd one out (three or more runs)."""
    labels = list(result.pairwise)
    bound = result.bound.value
    verdict = {r.label: r.verdict for r in result.runs}
    for a in labels:  # runs that produce the same numbers (e.g. two releases with the same bug)
        group = next((g for g in result.same_numbers if result.pairwise[g[0]][a] <= bound), None)
        if group is None:
            result.same_numbers.append([a])
        else:
            group.append(a)
    if len(labels) >= 3:
        for a in labels:
            others = [b for b in labels if b != a]
            rest_agree = all(result.pairwise[b][c] <= bound for b in others for c in others if b != c)
            # the odd one out must be the one that is wrong: it diverges from the reference, the others do not
            if (rest_agree and all(result.pairwise[a][b] > bound for b in others) and verdict[a] == "diverge"
                    and all(verdict[b] == "agree" for b in others)):
                result.odd_one_out = a
