"""The spec's optimizer written out in float64, applied to any gradients: the reference side of the update check.

`trajectory` replays a framework's run step by step from the framework's OWN parameters and gradients (teacher
forced): at step s it starts from the parameters the framework had before step s, applies the spec's optimizer to
the gradients the framework reported for step s, with optimizer state built from the framework's earlier gradients,
and returns the parameters and state the framework should have after step s. Comparing those with what the framework
has tests its optimizer step in isolation from its gradients (checked separately) and from trajectory drift (which
in low precision would otherwise turn parameter rounding into false alarms).

`Variant` describes one way an optimizer can be wrong (weight decay missing or applied to excluded parameters, lr
scaled, bias correction off, step counter off by one, eps placement, gradients scaled or clipped differently,
gradients carried across steps). `optsig` replays variants to name a difference. Semantics follow torch:
- SGD: d = g + wd * p; momentum buffer b = d on the first step, b = mu * b + d after; p -= lr * b.
- AdamW: p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
  p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
- clipping (clip_grad_norm > 0): g *= min(1, max_norm / (||g|| + 1e-6)) over all parameters, before the optimizer.
Parameters whose name matches a pattern of `optimizer.no_decay` get no weight decay.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from .spec import OptimizerSpec

Tensors = dict[str, "torch.Tensor"]

CLIP_EPS = 1e-6
"""torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6)."""


@dataclass(frozen=True)
class Variant:
    """The spec's optimizer, or one specific deviation from it (every field at its default = the spec's)."""

    name: str = "correct"
    text: str = "the spec's optimizer"
    lr_scale: tuple[float, ...] | float = 1.0
    """Multiplier of the lr: one number, or one per step."""
    decay: Literal["spec", "none", "all"] | frozenset[str] = "spec"
    """Which parameters decay: as the spec says, none, all (ignoring optimizer.no_decay), or exactly these names."""
    bias_correction: bool = True
    step_offset: int = 0
    """The step counter Adam's bias correction uses is t + step_offset (t = 1 on the first step)."""
    eps: Literal["outside", "inside-sqrt", "before-bias-correction"] = "outside"
    """Where eps goes: torch's sqrt(v_hat) + eps; sqrt(v_hat + eps); or (sqrt(v) + eps) / sqrt(1 - b2^t)."""
    grad_scale: tuple[float, ...] | None = None
    """The total multiplier each step's gradient gets before the optimizer, replacing the spec's clip coefficient
    (None = clip as the spec says)."""
    carry: bool = False
    """The optimizer sees the sum of this and all earlier steps' gradients (no zero_grad between steps)."""
    momentum: float | None = None
    """SGD momentum override (None = the spec's)."""


CORRECT = Variant()


@dataclass
class State:
    """Optimizer state: per-parameter tensors (float64) and the step counter."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    step: int = 0


def decays(name: str, spec_opt: OptimizerSpec, variant: Variant = CORRECT) -> bool:
    """Whether parameter `name` gets weight decay under `variant`."""
    if isinstance(variant.decay, frozenset):
        return name in variant.decay
    if variant.decay == "none":
        return False
    if variant.decay == "all":
        return True
    return not any(re.search(p, name) for p in spec_opt.no_decay)


def clip_coefficient(grads: Mapping[str, torch.Tensor], max_norm: float) -> float:
    """torch's clip_grad_norm_ coefficient (1.0 when clipping is off or does not act)."""
    if max_norm <= 0:
        return 1.0
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    return min(1.0, max_norm / (norm + CLIP_EPS))


def _at(x: tuple[float, ...] | float, s: int) -> float:
    return x[s] if isinstance(x, tuple) else x


def step(opt: OptimizerSpec, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: State,
         s: int, variant: Variant = CORRECT) -> tuple[Tensors, State, float]:
    """One optimizer step in float64 from `params` with `grads` (already summed over carried steps if the variant
    carries); returns (new params, new state, the gradient multiplier used). `s` is the 0-based step index."""
    import torch

    coef = variant.grad_scale[s] if variant.grad_scale is not None else clip_coefficient(grads, opt.clip_grad_norm)
    lr = opt.lr * _at(variant.lr_scale, s)
    t = state.step + 1
    new_state = State({}, t)
    out: Tensors = {}
    for name, p0 in params.items():
        p = p0.double()
        g = grads[name].double() * coef
        wd = opt.weight_decay if decays(name, opt, variant) else 0.0
        st = state.tensors.get(name, {})
        if opt.name == "sgd":
            mu = opt.momentum if variant.momentum is None else variant.momentum
            d = g + wd * p if wd else g
            if mu:
                buf = d.clone() if "momentum_buffer" not in st else mu * st["momentum_buffer"] + d
                new_state.tensors[name] = {"momentum_buffer": buf}
                d = buf
            out[name] = p - lr * d
            continue
        b1, b2 = opt.betas
        m = (1 - b1) * g if "exp_avg" not in st else b1 * st["exp_avg"] + (1 - b1) * g
        v = (1 - b2) * g * g if "exp_avg_sq" not in st else b2 * st["exp_avg_sq"] + (1 - b2) * g * g
        new_state.tensors[name] = {"exp_avg": m, "exp_avg_sq": v}
        tb = t + variant.step_offset
        bc1 = 1 - b1 ** tb if variant.bias_correction else 1.0
        bc2 = 1 - b2 ** tb if variant.bias_correction else 1.0
        if bc1 <= 0 or bc2 <= 0:  # a step counter at 0: the bias correction divides by zero
            out[name] = torch.full_like(p, math.nan)
            continue
        if variant.eps == "outside":
            denom = v.sqrt() / math.sqrt(bc2) + opt.eps
        elif variant.eps == "inside-sqrt":
            denom = (v / bc2 + opt.eps).sqrt()
        else:
            denom = (v.sqrt() + opt.eps) / math.sqrt(bc2)
        out[name] = p * (1 - lr * wd) - (lr / bc1) * m / denom
    return out, new_state, coef


@dataclass
class Expected:
    """What the framework should have after one step, given its own parameters before and its own gradients."""

    params: Tensors
    state: State
    coef: float
    """The gradient multiplier (clip coefficient) the optimizer used."""


def trajectory(opt: OptimizerSpec, init: Mapping[str, torch.Tensor], params: Sequence[Mapping[str, torch.Tensor]],
               grads: Sequence[Mapping[str, torch.Tensor]], variant: Variant = CORRECT,
               steps: int | None = None) -> list[Expected]:
    """Teacher-forced replay: step s starts from `params[s-1]` (`init` for s = 0) with `grads[s]`, and the state
    built by this replay from the earlier gradients."""
    n = len(grads) if steps is None else steps
    state = State()
    out = []
    carried: Tensors | None = None
    names = list(init)
    for s in range(n):
        before = init if s == 0 else params[s - 1]
        g = {k: grads[s][k].double() for k in names}
        if variant.carry:
            carried = g if carried is None else {k: carried[k] + g[k] for k in names}
            g = carried
        new, state, coef = step(opt, {k: before[k] for k in names}, g, state, s, variant)
        out.append(Expected(new, state, coef))
    return out


def with_(variant: Variant, **kw: object) -> Variant:
    return replace(variant, **kw)  # type: ignore[arg-type]
