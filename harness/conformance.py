"""The adapter conformance kit: properties every adapter must have, checked against the adapter itself.

Run on a configuration where no aggregation bug can act (one sample per micro-batch, one micro-batch, one rank,
two SGD steps) unless the adapter's `conformance_knobs` say otherwise. One framework worker serves every spec
(which is itself checked: a worker must be able to serve several specs).

Checks:
- init:        the step-0 loss equals the reference's (the shared initial weights were loaded), and a different
               model.seed changes it the same way it changes the reference's;
- order:       per-step gradients over two steps equal the reference's (each step saw the spec's samples);
- pre-clip:    with clipping far below the gradient norm, the recorded gradient is the unclipped one and the update
               is the clipped one;
- repeat:      the same spec twice gives the same numbers;
- zero-lr:     lr = 0 leaves every parameter exactly unchanged;
- unsupported: specs outside the adapter's declared capabilities are reported by `unsupported()` (not run).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import envs
from .diff import dict_diff, subtract
from .model import write_init_weights
from .record import Record
from .registry import get_adapter
from .runner import FrameworkPin, _environment, run_reference, worker_env
from .spec import Spec, from_dict, to_dict
from .workers import Worker


@dataclass
class Check:
    name: str
    passed: bool | None
    """None = not applicable to this adapter."""
    detail: str


def base_spec(pin: FrameworkPin) -> Spec:
    cls = get_adapter(pin.name)
    raw: dict[str, Any] = {"case": {"name": f"conformance-{pin.name}"}, "batch": {"steps": 2},
                           "optimizer": {"name": "sgd", "lr": 0.1}}
    knobs = getattr(cls, "conformance_knobs", None)
    if knobs:
        raw[pin.name] = dict(knobs)
    # an adapter whose framework builds only some optimizers (OpenRLHF: AdamW) gives the kit its own
    raw["optimizer"].update(getattr(cls, "conformance_optimizer", {}))
    return from_dict(raw)


def run_conformance(pin: FrameworkPin, spec: Spec | None = None, workdir: Path | None = None) -> list[Check]:
    spec = spec or base_spec(pin)
    wd = Path(workdir or tempfile.mkdtemp(prefix="stepdiff-conformance-"))
    cls = get_adapter(pin.name)
    checks: list[Check] = [_check_unsupported(cls, spec, pin.version)]
    reason = cls.unsupported(spec, pin.version)
    if reason:
        return [*checks, Check("run", False, f"the conformance spec itself is unsupported: {reason}")]
    env = _environment(pin)
    init_dir = envs.cache_root() / "init"
    variants = {
        "base": spec,
        "seed": spec.replace(model__seed=spec.model.seed + 1),
        "clip": spec.replace(optimizer__clip_grad_norm=1e-3),
        "zero-lr": spec.replace(optimizer__lr=0.0),
    }
    refs = {k: run_reference(v, write_init_weights(v, init_dir), wd / f"ref-{k}", calibrate=(k == "base"))
            for k, v in variants.items()}
    bound = refs["base"][1].value
    recs: dict[str, Record] = {}
    with Worker(pin.name, env.python, spec.batch.world_size, spec.run.device, workdir=wd / "worker",
                env=worker_env(env)) as w:
        for key, v in [*variants.items(), ("repeat", spec)]:
            out = wd / f"rec-{key}"
            w.submit({"spec": to_dict(v), "init": str(write_init_weights(v, init_dir)), "out": str(out)},
                     v.run.timeout_s)
            recs[key] = Record.load(out)
    ref = {k: r[0] for k, r in refs.items()}

    def grad_err(a: Record, b: Record, step: int = 0) -> float:
        return dict_diff(a.steps[step].grads, b.steps[step].grads).total.rel

    def rel(a: float, b: float) -> float:
        return abs(a - b) / abs(b) if b else abs(a)

    loss_err = rel(recs["base"].steps[0].loss, ref["base"].steps[0].loss)
    seed_err = rel(recs["seed"].steps[0].loss, ref["seed"].steps[0].loss)
    moved = rel(ref["seed"].steps[0].loss, ref["base"].steps[0].loss)
    checks.append(Check("init", loss_err <= bound and seed_err <= bound and moved > 10 * bound,
                        f"step-0 loss rel error {loss_err:.1e} (seed {spec.model.seed}) and {seed_err:.1e} (seed "
                        f"{spec.model.seed + 1}); the seed moves the loss by {moved:.1e}; bound {bound:.1e}"))
    errs = [grad_err(recs["base"], ref["base"], s) for s in range(spec.batch.steps)]
    checks.append(Check("order", max(errs) <= bound, "gradient rel error per step: "
                        + ", ".join(f"{e:.1e}" for e in errs) + f"; bound {bound:.1e}"))
    clip_grad = grad_err(recs["clip"], ref["clip"])
    init = _load_init(variants["clip"], init_dir)
    upd = dict_diff(subtract(recs["clip"].steps[0].params, init), subtract(ref["clip"].steps[0].params, init)).total
    unclipped = dict_diff(subtract(recs["clip"].steps[0].params, init),
                          {n: -spec.optimizer.lr * g.double() for n, g in ref["clip"].steps[0].grads.items()}).total
    checks.append(Check("pre-clip", clip_grad <= bound and upd.rel <= 10 * bound and unclipped.rel > 0.5,
                        f"recorded gradient vs unclipped reference {clip_grad:.1e}; update vs clipped reference "
                        f"{upd.rel:.1e}; update vs unclipped {unclipped.rel:.2f} (must be far)"))
    rep = max(grad_err(recs["repeat"], recs["base"], s) for s in range(spec.batch.steps))
    loss_rep = abs(recs["repeat"].steps[0].loss - recs["base"].steps[0].loss)
    checks.append(Check("repeat", rep <= 1e-6 and loss_rep <= 1e-6 * max(1.0, abs(recs["base"].steps[0].loss)),
                        f"second run of the same spec in the same worker: gradient rel diff {rep:.1e}, loss diff "
                        f"{loss_rep:.1e}" + (" (bitwise identical)" if rep == 0 and loss_rep == 0 else "")))
    zl = recs["zero-lr"]
    zinit = _load_init(variants["zero-lr"], init_dir)
    moved_abs = max(float((zl.steps[-1].params[n].double() - zinit[n].double()).abs().max()) for n in zinit
                    if n in zl.steps[-1].params)
    checks.append(Check("zero-lr", moved_abs == 0.0 and math.isfinite(moved_abs),
                        f"max |param after - init| with lr 0: {moved_abs:.1e}"))
    return checks


def _load_init(spec: Spec, init_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(write_init_weights(spec, init_dir)))


def _check_unsupported(cls: Any, spec: Spec, version: str | None) -> Check:
    caps = cls.capabilities
    probes = []
    if "float64" not in caps.dtypes:
        probes.append(("model.dtype = float64", spec.replace(model__dtype="float64")))
    for kind in ("policy", "value", "dpo"):
        if kind not in caps.loss_kinds:
            probes.append((f"loss.kind = {kind}", spec.replace(loss__kind=kind, loss__aggregation="token-mean")))
            break
    if not probes:
        return Check("unsupported", None, "the adapter declares every probed capability")
    missed = [what for what, s in probes if not cls.unsupported(s, version)]
    return Check("unsupported", not missed, "reported as unsupported: " + ", ".join(w for w, _ in probes)
                 if not missed else f"NOT reported as unsupported: {', '.join(missed)}")
