"""The reference's own errors, measured on the same spec, that set every bound (see tolerance).

- gradients: the reference's working-precision gradient at each step against float64 from the SAME parameters (the
  float64 run is teacher forced along the working-precision run's own trajectory), over all parameters and per
  parameter; worst step;
- micro-batch weights: the working-precision gradient fitted on the float64 per-micro-batch contributions;
- updates and optimizer state: the reference's own optimizer step (torch's) against harness.optim's float64 replay of
  the spec's optimizer from the same parameters and gradients, beyond parameter rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import optim
from .compare import fit_step, start_weights
from .diff import dict_diff, update_diff
from .record import Record
from .spec import Spec
from .tolerance import Bound, bound_for

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SelfErrors:
    gradient: float
    per_param: dict[str, float]
    weights: float | None
    """None when the float64 run kept no contributions to fit on."""
    update: float


def self_errors(spec: Spec, ref: Record, ref64: Record, init: dict[str, torch.Tensor]) -> SelfErrors:
    total = 0.0
    per_param: dict[str, float] = {}
    weights: float | None = None
    for s, (a, b) in enumerate(zip(ref.steps, ref64.steps, strict=True)):
        d = dict_diff(a.grads, b.grads)
        total = max(total, d.total.rel)
        for p in d.per_param:
            per_param[p.name] = max(per_param.get(p.name, 0.0), p.rel)
        if any(k.startswith(f"contrib/{s}/") for k in ref64.extras):
            fit, _ = fit_step(spec, a.grads, ref64, s, None)
            weights = max([weights or 0.0, *(abs(w - 1.0) for w in fit.weights)])
    update = 0.0
    init = start_weights(spec, init)
    exp = optim.trajectory(spec.optimizer, init, [st.params for st in ref.steps], [st.grads for st in ref.steps])
    for s, (st, e) in enumerate(zip(ref.steps, exp, strict=True)):
        before = init if s == 0 else ref.steps[s - 1].params
        u = update_diff(st.params, e.params, before, spec.model.dtype)
        update = max(update, u.total.rel, max((p.rel for p in u.per_param), default=0.0))
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            fw = {n: kv[key] for n, kv in st.state.items() if key in kv}
            if fw:
                sd = dict_diff(fw, {n: kv[key] for n, kv in e.state.tensors.items()})
                update = max(update, sd.total.rel, max((p.rel for p in sd.per_param), default=0.0))
    return SelfErrors(total, per_param, weights, update)


def calibrate(spec: Spec, ref: Record, ref64: Record | None, init: dict[str, torch.Tensor]) -> Bound:
    """The case's bounds (CalibrationError when the reference disagrees with its own float64 run)."""
    run = spec.run
    if ref64 is None:
        return bound_for(spec.model.dtype, None, run.rel_tolerance, update_override=run.update_tolerance)
    e = self_errors(spec, ref, ref64, init)
    return bound_for(spec.model.dtype, e.gradient, run.rel_tolerance, per_param_self_error=e.per_param,
                     update_self_error=e.update, update_override=run.update_tolerance, weight_self_error=e.weights)
