"""Optimizer isolation: when a framework's update differs from the spec's optimizer applied to the framework's OWN
gradients, name the difference from the numbers.

Each candidate is the spec's optimizer with one thing changed (harness.optim.Variant), replayed teacher forced along
the framework's own parameters and gradients; a candidate explains the run when its updates match the framework's
within the update bound at every step. Candidates: weight decay not applied (to all parameters, or to some), weight
decay applied to parameters optimizer.no_decay excludes, bias correction off, Adam's step counter one ahead, eps
inside the square root or before the bias correction, gradients carried across steps (no zero_grad), SGD momentum
not applied; then fitted ones: an lr multiplier per step (a constant one is "lr scaled"), and a gradient multiplier
per step, named by its pattern (a power of two: a loss scale not undone; max(1, c / norm): clipping with max
instead of min; 1 where clipping should act: clipping not applied; anything else: a different clip coefficient).
Nothing here knows a framework or a version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import optim
from .diff import update_diff

if TYPE_CHECKING:
    import torch

    from .spec import OptimizerSpec

Tensors = Mapping[str, "torch.Tensor"]


@dataclass(frozen=True)
class OptFinding:
    name: str
    """'correct', a variant name such as 'no-weight-decay', or 'unexplained'."""
    text: str
    """One sentence for the report."""
    residual: float
    """The explaining candidate's worst update error (relative, beyond rounding) over the steps."""
    correct_residual: float
    """The spec's optimizer's worst update error against the framework: what needed explaining."""
    also: tuple[str, ...] = ()
    """Other candidates that explain the numbers equally well (indistinguishable on this case)."""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """A framework's steps as the isolation sees them."""

    opt: OptimizerSpec
    dtype: str
    init: Tensors
    params: Sequence[Tensors]
    grads: Sequence[Tensors]

    def before(self, s: int) -> Tensors:
        return self.init if s == 0 else self.params[s - 1]

    def errors(self, variant: optim.Variant) -> list[float]:
        """Per step: the relative update error of `variant` against the framework (beyond parameter rounding)."""
        exp = optim.trajectory(self.opt, self.init, self.params, self.grads, variant)
        return [_rel(update_diff(self.params[s], e.params, self.before(s), self.dtype).total.rel)
                for s, e in enumerate(exp)]

    def per_param_errors(self, variant: optim.Variant) -> dict[str, float]:
        """Per parameter: the worst relative update error of `variant` over the steps."""
        exp = optim.trajectory(self.opt, self.init, self.params, self.grads, variant)
        worst: dict[str, float] = {}
        for s, e in enumerate(exp):
            for p in update_diff(self.params[s], e.params, self.before(s), self.dtype).per_param:
                worst[p.name] = max(worst.get(p.name, 0.0), _rel(p.rel))
        return worst


def _rel(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def discrete_candidates(opt: OptimizerSpec, names: Sequence[str]) -> list[optim.Variant]:
    V = optim.Variant
    out = []
    excluded = [n for n in names if not optim.decays(n, opt)]
    if opt.weight_decay > 0:
        out.append(V("no-weight-decay", "weight decay not applied (to any parameter)", decay="none"))
        if excluded:
            out.append(V("decay-on-excluded", f"weight decay also applied to the {len(excluded)} parameters "
                                              f"optimizer.no_decay excludes (e.g. {excluded[0]})", decay="all"))
    if opt.name == "adamw":
        out += [
            V("no-bias-correction", "Adam's bias correction not applied (m and v used as they are)",
              bias_correction=False),
            V("step-counter-ahead", "Adam's step counter one ahead (bias correction of step t+1 used at step t)",
              step_offset=1),
            V("eps-inside-sqrt", "eps added inside the square root (sqrt(v_hat + eps) instead of sqrt(v_hat) + eps)",
              eps="inside-sqrt"),
            V("eps-before-bias-correction", "eps added before the bias correction ((sqrt(v) + eps) / sqrt(1 - b2^t))",
              eps="before-bias-correction"),
        ]
    elif opt.momentum > 0:
        out.append(V("no-momentum", "SGD momentum not applied", momentum=0.0))
    out.append(V("grads-carried", "gradients carried across steps: the optimizer saw the sum of this and every "
                                  "earlier step's gradient (no zero_grad between steps)", carry=True))
    return out


def isolate(opt: OptimizerSpec, dtype: str, init: Tensors, params: Sequence[Tensors], grads: Sequence[Tensors],
            bound: float) -> OptFinding:
    """Name the optimizer difference, or say 'correct' / 'unexplained'."""
    run = Run(opt, dtype, init, params, grads)
    correct = max(run.errors(optim.CORRECT))
    if correct <= bound:
        return OptFinding("correct", "the update is the spec's optimizer applied to the framework's own gradients",
                          correct, correct)
    names = list(init)
    scored: list[tuple[float, optim.Variant]] = []
    for v in discrete_candidates(opt, names):
        scored.append((max(run.errors(v)), v))
    fitted = [_per_param_decay(run, names, bound), _lr_scale(run), _grad_scale(run, bound)]
    scored += [(max(run.errors(v)), v) for v in fitted if v is not None]
    explaining = sorted([(r, v) for r, v in scored if r <= bound], key=lambda x: (_rank(x[1].name), x[0]))
    if not explaining:
        best_r, best = min(scored, key=lambda x: x[0])
        return OptFinding("unexplained", f"no single optimizer difference explains the update (the spec's optimizer "
                          f"is off by {correct:.3g}; closest candidate: {best.name}, off by {best_r:.3g})", best_r,
                          correct, details={"closest": best.name})
    r, v = explaining[0]
    also = tuple(x.name for _, x in explaining[1:] if x.name != v.name
                 and (_rank(v.name) > 0 or _rank(x.name) == 0))  # generic fits add nothing to a named mechanism
    return OptFinding(v.name, v.text, r, correct, also, details={"lr_scale": v.lr_scale, "grad_scale": v.grad_scale})


GENERIC = ("lr-scaled", "gradient-scaled", "clip-coefficient-different", "lr-per-step", "gradient-scaled-per-step")
"""Fitted explanations without a named mechanism: used only when no specific candidate explains the numbers (for
SGD an lr multiplier per step and a gradient multiplier per step are the same numbers)."""


def _rank(name: str) -> int:
    return 1 + GENERIC.index(name) if name in GENERIC else 0


def _per_param_decay(run: Run, names: Sequence[str], bound: float) -> optim.Variant | None:
    """Which parameters the framework decays, decided per parameter from whichever of 'decay' / 'no decay' fits."""
    if run.opt.weight_decay <= 0:
        return None
    on = run.per_param_errors(optim.Variant(decay="all"))
    off = run.per_param_errors(optim.Variant(decay="none"))
    spec_decayed = frozenset(n for n in names if optim.decays(n, run.opt))

    def flip(mine: float, other: float) -> bool:  # only where the other choice clearly fits better
        return mine > bound and other < 0.5 * mine

    decayed = frozenset(n for n in names
                        if (n in spec_decayed and not flip(on.get(n, math.inf), off.get(n, math.inf)))
                        or (n not in spec_decayed and flip(off.get(n, math.inf), on.get(n, math.inf))))
    if decayed == spec_decayed:
        return None
    missing = sorted(spec_decayed - decayed)
    extra = sorted(decayed - spec_decayed)
    parts = []
    if missing:
        parts.append(f"weight decay not applied to {len(missing)} parameter(s) the spec decays "
                     f"({_names(missing)})")
    if extra:
        parts.append(f"weight decay applied to {len(extra)} parameter(s) optimizer.no_decay excludes "
                     f"({_names(extra)})")
    name = "weight-decay-missing" if missing and not extra else "decay-on-excluded" if extra and not missing \
        else "weight-decay-groups"
    return optim.Variant(name, "; ".join(parts), decay=decayed)


def _names(ns: Sequence[str]) -> str:
    return ", ".join(ns[:4]) + (", ..." if len(ns) > 4 else "")


def _lr_scale(run: Run) -> optim.Variant | None:
    """Least-squares lr multiplier per step: the framework's update / the spec's update (both from the same start)."""
    exp = optim.trajectory(run.opt, run.init, run.params, run.grads)
    cs = []
    for s, e in enumerate(exp):
        b = run.before(s)
        num = den = 0.0
        for n in e.params:
            d_exp = e.params[n].double() - b[n].double()
            d_fw = run.params[s][n].double() - b[n].double()
            num += float((d_exp * d_fw).sum())
            den += float((d_exp * d_exp).sum())
        cs.append(num / den if den > 0 else 1.0)
    if all(abs(c - 1.0) < 1e-9 for c in cs):
        return None
    mean = sum(cs) / len(cs)
    if all(abs(c - mean) <= 1e-3 * abs(mean) for c in cs):
        return optim.Variant("lr-scaled", f"the update is the spec's with the lr multiplied by {mean:.6g} "
                                          f"(lr {run.opt.lr * mean:.6g} instead of {run.opt.lr:g})",
                             lr_scale=mean)
    return optim.Variant("lr-per-step", "the lr differs per step: multipliers "
                         + ", ".join(f"{c:.4g}" for c in cs), lr_scale=tuple(cs))


def _grad_scale(run: Run, bound: float) -> optim.Variant | None:
    """Fit, step by step, the multiplier the optimizer's input gradient got; name its pattern."""
    state = optim.State()
    ks: list[float] = []
    names = list(run.init)
    for s in range(len(run.grads)):
        g = {n: run.grads[s][n].double() for n in names}
        b = {n: run.before(s)[n] for n in names}

        def err(log_k: float, g: dict[str, Any] = g, b: dict[str, Any] = b, s: int = s,
                st: optim.State = state) -> float:
            v = optim.Variant(grad_scale=tuple([*ks, math.exp(log_k)]))
            new, _, _ = optim.step(run.opt, b, g, st, s, v)
            return _rel(update_diff(run.params[s], new, b, run.dtype).total.rel)

        grid = [i * math.log(2) for i in range(-24, 25)]
        vals = [err(x) for x in grid]
        i = min(range(len(grid)), key=lambda j: vals[j])
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        for _ in range(40):  # golden section inside the best bracket
            a = hi - (hi - lo) / 1.618033988749895
            c = lo + (hi - lo) / 1.618033988749895
            if err(a) < err(c):
                hi = c
            else:
                lo = a
        best = (lo + hi) / 2
        # identifiable only if doubling or halving the multiplier breaks the match (Adam is nearly scale-free)
        if err(best) > bound or min(err(best + math.log(2)), err(best - math.log(2))) <= bound:
            return None
        ks.append(math.exp(best))
        _, state, _ = optim.step(run.opt, b, g, state, s, optim.Variant(grad_scale=tuple(ks)))
    return _name_grad_scale(run, tuple(ks))


def _name_grad_scale(run: Run, ks: tuple[float, ...]) -> optim.Variant | None:
    expected = [optim.clip_coefficient(g, run.opt.clip_grad_norm) for g in run.grads]
    if all(abs(k / e - 1) < 1e-3 for k, e in zip(ks, expected, strict=True)):
        return None
    v = optim.Variant(grad_scale=ks)
    close = lambda a, b: abs(a / b - 1) < 1e-3  # noqa: E731
    c = run.opt.clip_grad_norm
    if c > 0:
        norms = [math.sqrt(sum(float(x.double().pow(2).sum()) for x in g.values())) for g in run.grads]
        as_max = [max(1.0, c / (nm + optim.CLIP_EPS)) for nm in norms]
        if all(close(k, 1.0) for k in ks):
            return replace(v, name="clipping-not-applied", text=f"gradient clipping at {c:g} not applied (clip "
                           "coefficients " + ", ".join(f"{e:.4g}" for e in expected) + " expected, 1 used)")
        if all(close(k, m) for k, m in zip(ks, as_max, strict=True)):
            return replace(v, name="clip-max-instead-of-min", text=f"clip coefficient max(1, {c:g} / norm) instead "
                           "of min: gradients below the threshold scaled up ("
                           + ", ".join(f"x{k:.4g}" for k in ks) + "), those above never clipped")
    ratios = [k / e for k, e in zip(ks, expected, strict=True)]
    logs = [math.log2(r) for r in ratios]
    n = round(logs[0])
    if abs(n) >= 4 and all(abs(x - n) < 1e-2 for x in logs):  # a power of two (the fit is blurred by rounding)
        what = (f"divided by 2^{-n} = {2 ** -n:g}: a loss scale never applied to the loss (or undone twice)" if n < 0
                else f"multiplied by 2^{n} = {2 ** n:g}: a loss scale applied to the loss and never undone")
        return replace(v, name="loss-scale-not-undone", text=f"the gradients reach the optimizer {what}")
    if all(close(r, ratios[0]) for r in ratios):
        return replace(v, name="gradient-scaled", text=f"the optimizer's input gradient scaled by {ratios[0]:.6g} "
                       "at every step")
    if c > 0:
        return replace(v, name="clip-coefficient-different", text="clip coefficients differ: expected "
                       + ", ".join(f"{e:.4g}" for e in expected) + ", used " + ", ".join(f"{k:.4g}" for k in ks))
    return replace(v, name="gradient-scaled-per-step", text="the optimizer's input gradient scaled per step by "
                   + ", ".join(f"{r:.4g}" for r in ratios))
