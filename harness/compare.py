"""Comparison of one framework record against the reference record: per-step diffs, the verdict and its bound, the
first diverging step, parameters ranked by error, and the micro-batch weight fit at that step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from . import data as D
from . import optim
from .diff import DictDiff, dict_diff, scalar_rel, update_diff
from .errors import WorkerError
from .optsig import OptFinding, isolate
from .record import Record
from .signatures import Fit, Signature, TokenFinding, describe, fit_weights, token_fit
from .spec import Spec
from .tolerance import Bound

if TYPE_CHECKING:
    import torch

Verdict = Literal["agree", "diverge", "error", "unsupported"]


@dataclass
class StepComparison:
    step: int
    loss: float
    loss_ref: float
    loss_rel: float | None
    grad_norm: float | None
    grad_norm_ref: float | None
    grad_norm_rel: float | None
    grad: DictDiff
    update: DictDiff
    """The framework's update against the spec's optimizer applied to the framework's own parameters and
    gradients, beyond parameter rounding (diff.update_diff)."""
    diverged: bool
    reasons: list[str] = field(default_factory=list)
    state: dict[str, DictDiff] = field(default_factory=dict)
    """Optimizer state (exp_avg, exp_avg_sq, momentum_buffer) against the same replay, where the framework exposes
    it."""
    opt_step: int | None = None
    opt_step_ref: int | None = None
    weights_dev: float | None = None
    """max |fitted micro-batch weight - 1| at this step (None when not fitted)."""
    carried: float | None = None
    """Fitted weight of the previous step's gradient inside this step's (0 when gradients are zeroed)."""
    kinds: tuple[str, ...] = ()
    """Which checks failed: 'gradient', 'loss', 'grad_norm', 'update', 'state'."""


@dataclass
class RunResult:
    framework: str
    version: str | None
    verdict: Verdict
    reason: str
    """One line: why this verdict."""
    bound: Bound | None = None
    steps: list[StepComparison] = field(default_factory=list)
    first_diverging_step: int | None = None
    fit: Fit | None = None
    fit_step: int | None = None
    signature: Signature | None = None
    """The shape of the divergence: the micro-batch signature when gradients differ, else an update-only,
    state-only or loss-only signature (never 'correct' for a run that diverges)."""
    meta: dict[str, Any] | None = None
    log_tail: str = ""
    env_versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra_pins: tuple[str, ...] = ()
    """Other pins of the run's version set, e.g. ('deepspeed==0.18.9',) next to trl."""
    supervision: list[str] = field(default_factory=list)
    """Differences between the tokens the framework supervises (when it reports them) and the spec's."""
    tokens: TokenFinding | None = None
    """The token-level fit at the first diverging step (SFT, tiny models)."""
    optimizer: OptFinding | None = None
    """Optimizer isolation: the spec's optimizer (and its named variants) applied to the framework's own gradients."""
    compared: dict[str, str] = field(default_factory=dict)
    """What was compared and from where: e.g. {'loss': 'not compared (fed by the adapter)', 'state': 'exp_avg,
    exp_avg_sq, step'}."""

    @property
    def label(self) -> str:
        return ",".join([f"{self.framework}=={self.version}" if self.version else self.framework, *self.extra_pins])

    @property
    def max_rel_grad_error(self) -> float | None:
        return max((s.grad.total.rel for s in self.steps), default=None)

    @property
    def worst_param(self) -> tuple[str, float] | None:
        s = self.steps[self.first_diverging_step or 0] if self.steps else None
        if s is None or not s.grad.per_param:
            return None
        return s.grad.per_param[0].name, s.grad.per_param[0].rel


def validate_record(spec: Spec, rec: Record, ref: Record) -> None:
    """An incomplete or non-finite record is an error, never a pass."""
    import torch

    if len(rec.steps) != spec.batch.steps:
        raise WorkerError(f"record has {len(rec.steps)} optimizer steps, the spec asked for {spec.batch.steps}")
    names = list(ref.steps[0].grads)
    for s, st in enumerate(rec.steps):
        if s < len(ref.steps):
            # no gradient for a parameter whose correct gradient is exactly zero (PyTorch leaves .grad None for a
            # parameter the loss does not reach) is right: read it as zero. Any other missing gradient is an error.
            for n in names:
                if n not in st.grads and not bool(ref.steps[s].grads[n].any()):
                    st.grads[n] = torch.zeros_like(ref.steps[s].grads[n])
        for kind, tensors in (("gradient", st.grads), ("parameter", st.params)):
            missing = [n for n in names if n not in tensors]
            if missing:
                raise WorkerError(f"step {s}: {kind} missing for {len(missing)} parameters, e.g. {missing[0]}")
            extra = [n for n in tensors if n not in ref.steps[0].grads] if kind == "gradient" else []
            if extra:
                raise WorkerError(f"step {s}: {kind} recorded for {len(extra)} parameters the reference's model does "
                                  f"not have, e.g. {extra[0]!r} (not canonical parameter names)")
            for n in names:
                t = tensors[n]
                if t.shape != ref.steps[0].grads[n].shape:
                    raise WorkerError(f"step {s}: {kind} {n} has shape {tuple(t.shape)}, expected "
                                      f"{tuple(ref.steps[0].grads[n].shape)}")
                if not bool(torch.isfinite(t).all()):
                    raise WorkerError(f"step {s}: {kind} {n} contains NaN/Inf")
        if s < len(ref.steps):
            # a read-out that found no gradient and filled in zeros is a missing gradient: an error, not a divergence
            zero = [n for n in names if not bool(st.grads[n].any()) and bool(ref.steps[s].grads[n].any())]
            if zero:
                raise WorkerError(f"step {s}: gradient missing for {len(zero)} parameters (exactly zero in every "
                                  f"element where the reference's is not), e.g. {zero[0]}: the read-out found no "
                                  "gradient")
        if not math.isfinite(st.loss):
            raise WorkerError(f"step {s}: the framework reported a non-finite loss ({st.loss})")
        if st.grad_norm is not None and not math.isfinite(st.grad_norm):
            raise WorkerError(f"step {s}: the framework reported a non-finite grad norm ({st.grad_norm})")


def reference_step(ref: Record, tref: Record | None, s: int) -> Any:
    """The reference's step s at the framework's own parameters: the teacher-forced reference for s >= 1 (the
    free-running one at step 0, where both start from the initial weights)."""
    return ref.steps[s] if tref is None or s == 0 else tref.steps[s]


def compare(spec: Spec, rec: Record, ref: Record, init: dict[str, torch.Tensor], bound: Bound, framework: str,
            version: str | None, tref: Record | None = None) -> RunResult:
    """Compare every step. `tref` is the reference replayed along the framework's own parameters (teacher forced):
    step s's gradient, loss and norm are compared with the reference's at the parameters the framework had before
    step s, so low-precision rounding of the trajectory cannot accumulate into a false alarm. The update and
    optimizer state are compared with the spec's optimizer applied to the framework's own parameters and gradients
    (harness.optim), so they test the optimizer step alone."""
    validate_record(spec, rec, ref)
    dtype = rec.meta.param_dtype or spec.model.dtype
    ub = bound.update_bound()
    if dtype != spec.model.dtype:  # float32 master weights recorded: updates are checked at their resolution
        from .tolerance import UPDATE_FLOOR

        ub = min(ub, UPDATE_FLOOR.get(dtype, ub))
    # every run builds its model in the spec's dtype: in low precision step 0 starts from the rounded initial weights
    init = start_weights(spec, init)
    params = [st.params for st in rec.steps]
    grads = [st.grads for st in rec.steps]
    expected = optim.trajectory(spec.optimizer, init, params, grads)
    src = rec.meta.source
    compared = {k: "not compared (" + ("fed or computed by the adapter" if src(k) == "adapter" else
                                       "the framework reports none") + ")"
                for k in ("loss", "grad_norm") if src(k) != "framework"}
    steps = []
    for s in range(spec.batch.steps):
        st, rt = rec.steps[s], reference_step(ref, tref, s)
        before = init if s == 0 else rec.steps[s - 1].params
        grad = dict_diff(st.grads, rt.grads)
        exp = expected[s]
        update = update_diff(st.params, exp.params, before, dtype)
        if spec.optimizer.lr > 0 and _unchanged(st.params, before) and not _unchanged(
                _rounded(exp.params, dtype), before):
            raise WorkerError(f"step {s}: the parameters did not change: the optimizer step did not happen")
        loss_rel = scalar_rel(st.loss, rt.loss) if src("loss") == "framework" else None
        norm_rel = scalar_rel(st.grad_norm, rt.grad_norm) if src("grad_norm") == "framework" else None
        reasons, kinds = [], []
        if grad.total.rel > bound.value:
            reasons.append(f"gradient rel error {grad.total.rel:.3g} > {bound.value:.1e}")
            kinds.append("gradient")
        else:
            over = [p for p in grad.per_param if p.rel > bound.param_bound(p.name)]
            if over:
                reasons.append(f"{over[0].name} gradient rel error {over[0].rel:.3g} > "
                               f"{bound.param_bound(over[0].name):.1e}")
                kinds.append("gradient")
        weights_dev = carried = None
        if _has_contribs(ref if tref is None or s == 0 else tref, s):
            fit_s, carried = fit_step(spec, st.grads, ref if tref is None or s == 0 else tref, s,
                                      rec.steps[s - 1].grads if s > 0 else None)
            weights_dev = max((abs(w - 1.0) for w in fit_s.weights), default=0.0)
            if bound.weights > 0 and weights_dev > bound.weights and "gradient" not in kinds:
                reasons.append(f"micro-batch weights off by {weights_dev:.3g} > {bound.weights:.1e}")
                kinds.append("gradient")
            if carried is not None and bound.weights > 0 and abs(carried) > bound.weights:
                reasons.append(f"step {s - 1}'s gradient carried into step {s} (weight {carried:.3g})")
                if "gradient" not in kinds:
                    kinds.append("gradient")
        if loss_rel is not None and loss_rel > bound.value:
            reasons.append(f"reported loss rel error {loss_rel:.3g}")
            kinds.append("loss")
        if norm_rel is not None and norm_rel > bound.value:
            reasons.append(f"reported grad norm rel error {norm_rel:.3g}")
            kinds.append("grad_norm")
        worst_u = next(iter(update.per_param), None)
        if update.total.rel > ub:
            reasons.append(f"update rel error {update.total.rel:.3g} > {ub:.1e}")
            kinds.append("update")
        elif worst_u is not None and worst_u.rel > ub:
            reasons.append(f"{worst_u.name} update rel error {worst_u.rel:.3g} > {ub:.1e}")
            kinds.append("update")
        state = {}
        if st.state and src("state") == "framework":
            for key in sorted({k for kv in exp.state.tensors.values() for k in kv}):
                fw = {n: kv[key] for n, kv in st.state.items() if key in kv}
                if not fw:
                    continue
                state[key] = dict_diff(fw, {n: kv[key] for n, kv in exp.state.tensors.items()})
                d = state[key]
                if d.missing:
                    reasons.append(f"optimizer state {key} missing for {len(d.missing)} parameters, e.g. "
                                   f"{d.missing[0]}")
                    kinds.append("state")
                elif d.total.rel > ub or (d.per_param and d.per_param[0].rel > ub):
                    worst = d.per_param[0]
                    reasons.append(f"optimizer state {key} rel error {d.total.rel:.3g} (worst {worst.name} "
                                   f"{worst.rel:.3g}) > {ub:.1e}")
                    kinds.append("state")
        if st.opt_step is not None and st.opt_step != exp.state.step:
            reasons.append(f"optimizer step counter {st.opt_step}, expected {exp.state.step}")
            kinds.append("state")
        steps.append(StepComparison(
            s, st.loss, rt.loss, loss_rel, st.grad_norm, rt.grad_norm, norm_rel, grad, update, bool(reasons), reasons,
            state, st.opt_step, exp.state.step if st.opt_step is not None else None, weights_dev, carried,
            tuple(dict.fromkeys(kinds))))
    compared.update(_what_was_compared(rec, steps))
    first = next((c.step for c in steps if c.diverged), None)
    fit_step_ = first if first is not None else 0
    fit = signature = None
    fit_ref = ref if tref is None or fit_step_ == 0 else tref
    if _has_contribs(fit_ref, fit_step_):
        fit, signature = fit_microbatches(spec, rec.steps[fit_step_].grads, fit_ref, fit_step_)
        carried_w = steps[fit_step_].carried
        if carried_w is not None and bound.weights > 0 and abs(carried_w) > bound.weights:
            fit, _ = fit_step(spec, rec.steps[fit_step_].grads, fit_ref, fit_step_, rec.steps[fit_step_ - 1].grads)
            inner = describe(fit, D.microbatch_token_counts(spec, fit_step_))
            signature = Signature("grads-carried", f"step {fit_step_ - 1}'s gradient is still inside step "
                                  f"{fit_step_}'s (weight {carried_w:.3g}): gradients are not zeroed between "
                                  f"optimizer steps; the micro-batches themselves: {inner.name}",
                                  abs(carried_w - 1.0))
    if signature is not None and signature.name == "unexplained" and first is not None \
            and "gradient" in steps[first].kinds:
        groups = parameter_groups(spec, rec.steps[first].grads, fit_ref, first)
        if groups is not None:
            signature = groups
    supervision = check_supervision(spec, rec.meta.extra.get("supervised_targets"))
    diverged = first is not None or bool(supervision)
    if not diverged and signature is not None and signature.name != "correct":
        # an agreeing gradient IS the correct aggregation: weights off 1 here are not identifiable (nearly collinear
        # contributions), never a finding
        assert fit is not None
        note = "".join(f"; {fit.labels[i]}: no gradient contribution in the reference (weight undetermined)"
                       for i in fit.undetermined)
        signature = Signature("correct", "the gradient agrees within the bound; where fitted weights differ from 1 the "
                              "contributions are nearly collinear and their weights not identifiable" + note, 0.0)
    opt_finding = None
    if any("update" in c.kinds for c in steps) or any("state" in c.kinds for c in steps):
        opt_finding = isolate(spec.optimizer, dtype, init, params, grads, ub)
    result = RunResult(framework, version, "diverge" if diverged else "agree", "", bound, steps, first,
                       fit, fit_step_, signature, supervision=supervision, optimizer=opt_finding, compared=compared)
    if first is not None:
        result.signature = overall_signature(spec, steps[first], signature, opt_finding, fit, bound)
        later = [c.step for c in steps if c.carried is not None and bound.weights > 0
                 and abs(c.carried - 1.0) <= max(bound.weights, 1e-3) and c.step > first]
        if later and result.signature.name != "grads-carried":
            sig = result.signature
            result.signature = Signature(sig.name + "+grads-carried", sig.text + f"; and from step {later[0]} each "
                                         "step's gradient still holds the previous step's (no zero_grad between "
                                         "steps)", sig.max_deviation)
    if first is None:
        result.reason = (f"max gradient rel error {result.max_rel_grad_error:.2g} <= bound {bound.value:.1e}; "
                         f"max update rel error {max(c.update.total.rel for c in steps):.2g} <= {ub:.1e}")
    else:
        result.reason = f"step {first}: " + "; ".join(steps[first].reasons)
    if supervision:
        result.reason = "supervised tokens differ from the spec: " + "; ".join(supervision) + "; " + result.reason
    return result


def start_weights(spec: Spec, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The initial weights as every run holds them: rounded to the spec's dtype (float32 copies)."""
    if spec.model.dtype in ("float32", "float64"):
        return init
    return {n: t.float() for n, t in _rounded(init, spec.model.dtype).items()}


def _unchanged(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> bool:
    return all(bool((after[n].double() == before[n].double()).all()) for n in after if n in before)


def _rounded(params: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """What the parameters would be once stored in `dtype` (a low-precision step too small to change any stored
    parameter is not a step that did not happen)."""
    import torch

    dt = getattr(torch, dtype)
    return {n: t.to(dt).double() for n, t in params.items()}


def _has_contribs(ref: Record, s: int) -> bool:
    return any(k.startswith(f"contrib/{s}/") for k in ref.extras)


def _what_was_compared(rec: Record, steps: list[StepComparison]) -> dict[str, str]:
    out = {"update": "per parameter and in total, every step, against the spec's optimizer applied to the "
                     "framework's own parameters and gradients (beyond parameter rounding)"}
    keys = sorted({k for c in steps for k in c.state})
    if keys or any(c.opt_step is not None for c in steps):
        out["state"] = ", ".join(keys + (["step"] if any(c.opt_step is not None for c in steps) else []))
    else:
        out["state"] = "not compared (the framework's optimizer state is not exposed)"
    return out


def _sharpen(sig: Signature, fit: Fit | None, bound: Bound) -> Signature:
    """A diverging gradient never gets 'correct': weights inside the naming tolerance but outside the calibrated
    weight bound (a 2 % scale in bf16) are named at the bound's resolution; a uniform power-of-two scale is a loss
    scale."""
    if fit is None or not fit.weights:
        return sig
    w = list(fit.weights)
    mean = sum(w) / len(w)
    tol = max(bound.weights, 1e-6)
    uniform = all(abs(x - mean) <= tol * max(abs(mean), 1.0) for x in w)
    if sig.name in ("correct", "uniform-scale") and uniform and abs(mean - 1) > tol:
        n = round(math.log2(mean)) if mean > 0 else 0
        if abs(n) >= 4 and abs(math.log2(mean) - n) < 1e-2:
            what = "divided by" if n < 0 else "multiplied by"
            return Signature("loss-scale-not-undone", f"every micro-batch weighted 2^{n}: the gradient is {what} "
                             f"{2.0 ** abs(n):g}, a loss scale not undone (or undone without being applied)",
                             abs(mean - 2.0 ** n))
        return Signature("uniform-scale", f"every micro-batch weighted {mean:.4g}x: the whole gradient is scaled by "
                         f"{mean:.4g}", max(abs(x - mean) for x in w))
    if sig.name == "correct":
        return Signature("unexplained", "the gradient differs beyond the bound, but not as a re-weighting of "
                         "micro-batches: " + ", ".join(f"{lab} {x:.4g}" for lab, x in zip(fit.labels, w, strict=True)),
                         math.inf)
    return sig


def overall_signature(spec: Spec, first: StepComparison, grad_sig: Signature | None,
                      opt_finding: OptFinding | None, fit: Fit | None = None, bound: Bound | None = None) -> Signature:
    """The signature of a diverging run, from which checks failed at its first diverging step: gradient shape when
    gradients differ; else the optimizer isolation (update-only / state-only); else loss-only or grad-norm-only."""
    kinds = set(first.kinds)
    if "gradient" in kinds and grad_sig is not None:
        return _sharpen(grad_sig, fit, bound) if bound is not None else grad_sig
    if "gradient" in kinds:
        return Signature("unexplained", "gradients differ (no per-micro-batch contributions to fit)", math.inf)
    if kinds & {"update", "state"}:
        only = "update-only" if "update" in kinds else "state-only"
        if opt_finding is None or opt_finding.name == "correct":
            return Signature(only, f"gradients agree; the {'update' if only == 'update-only' else 'optimizer state'} "
                             "differs from the spec's optimizer applied to the framework's own gradients",
                             first.update.total.rel)
        also = f" (equally: {', '.join(opt_finding.also)})" if opt_finding.also else ""
        return Signature(f"{only}:{opt_finding.name}", f"gradients agree; optimizer isolation: {opt_finding.text}"
                         f"{also}", opt_finding.residual)
    if "loss" in kinds:
        ratio = first.loss / first.loss_ref if first.loss_ref else math.inf
        b = spec.batch
        known = ((b.grad_accum, "x grad_accum"), (1 / b.grad_accum, "/ grad_accum"), (b.world_size, "x world_size"),
                 (1 / b.world_size, "/ world_size"))
        hint = next((f" (= {what})" for val, what in known if val != 1 and abs(ratio / val - 1) < 1e-3), "")
        return Signature("loss-only", f"gradients and updates agree; only the loss the framework reports differs: "
                         f"x{ratio:.6g} the reference's{hint}", abs(ratio - 1))
    return Signature("grad-norm-only", "gradients and updates agree; only the grad norm the framework reports differs"
                     + (f": x{first.grad_norm / first.grad_norm_ref:.6g} the reference's"
                        if first.grad_norm and first.grad_norm_ref else ""), first.grad_norm_rel or math.inf)


def check_supervision(spec: Spec, reported: dict[str, list[int]] | None) -> list[str]:
    """Compare the target positions a framework says it supervises with the spec's, per sample, and name the classic
    off-by-one shapes (first response token dropped, EOS dropped, last prompt token trained)."""
    if not reported:
        return []
    smp = D.samples(spec)
    findings: dict[str, list[int]] = {}
    for key, positions in reported.items():
        i = int(key)
        s = smp[i]
        want = ({t for t, on in enumerate(D.supervised_targets(spec, s), start=1) if on}
                if D.included(spec, s) else set())  # a sample rl.mask_truncated removes supervises nothing
        got = set(positions)
        n_prompt, n_total = len(s.prompt), len(s.prompt) + len(s.response)
        for t in sorted(want - got):
            what = ("first response token not supervised" if t == n_prompt else
                    "last token (EOS) not supervised" if t == n_total - 1 else f"target position {t} not supervised")
            findings.setdefault(what, []).append(i)
        for t in sorted(got - want):
            what = ("last prompt token supervised" if t == n_prompt - 1 else
                    f"position {t} supervised although the spec does not supervise it")
            findings.setdefault(what, []).append(i)
    return [f"{what} (samples {', '.join(map(str, sorted(set(ids))[:8]))}"
            f"{', ...' if len(set(ids)) > 8 else ''})" for what, ids in findings.items()]


def fit_tokens(spec: Spec, grads: dict[str, torch.Tensor], token_ref: Record) -> TokenFinding:
    """The token-level fit of a framework's step gradient on the reference's per-token contributions."""
    contribs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, t in token_ref.extras.items():
        if key.startswith("tok/"):
            _, sample, pos, name = key.split("/", 3)
            contribs.setdefault((int(sample), int(pos)), {})[name] = t
    smp = D.samples(spec)
    samples = sorted({s for s, _ in contribs})
    supervised = {s: {t for t, on in enumerate(D.supervised_targets(spec, smp[s]), start=1) if on} for s in samples}
    padding = {s: len(smp[s].prompt) + len(smp[s].response) for s in samples}
    return token_fit(grads, contribs, supervised, {s: len(smp[s].prompt) for s in samples},
                     padding={s: t for s, t in padding.items() if (s, t) in contribs})


GROUP_MIN_SHARE = 0.8
"""A per-parameter explanation must account for this share of the parameters that fit cleanly on their own."""


def parameter_groups(spec: Spec, grads: dict[str, torch.Tensor], ref: Record, step: int) -> Signature | None:
    """When no single re-weighting explains the whole gradient, fit each parameter on its own: ZeRO partitions or
    per-group code paths can give different parameters different micro-batch weights (e.g. each rank's partition
    its own rank's boundary micro-batch). Names the groups, and the rank-local boundary pattern when it is that."""
    contribs, labels = _contributions(spec, ref, step)
    k = len(contribs)
    clean: dict[tuple[float, ...], list[str]] = {}
    fitted = 0
    for n, g in grads.items():
        if g.numel() < 4 * k or not all(n in c for c in contribs):
            continue
        fitted += 1
        f = fit_weights({n: g}, [{n: c[n]} for c in contribs], labels)
        if f.residual <= 0.02:
            clean.setdefault(tuple(round(w, 2) + 0.0 for w in f.weights), []).append(n)
    total = sum(len(v) for v in clean.values())
    if len(clean) < 2 or len(clean) > 4 or total < GROUP_MIN_SHARE * fitted:
        return None
    b = spec.batch
    parts = []
    local = True
    for w, names in sorted(clean.items(), key=lambda kv: -len(kv[1])):
        parts.append(f"{len(names)} parameter(s) (e.g. {names[0]}) weights [" + ", ".join(f"{x:g}" for x in w) + "]")
        # rank-local boundary micro-batch: 1 everywhere except the last micro-batch of each rank: WS on one rank, 0
        # on the others
        lasts = [w[r * b.grad_accum + b.grad_accum - 1] for r in range(b.world_size)]
        rest = [x for i, x in enumerate(w) if i % b.grad_accum != b.grad_accum - 1]
        local &= (b.world_size > 1 and all(abs(x - 1) < 0.02 for x in rest)
                  and sorted(round(x) for x in lasts) == [0] * (b.world_size - 1) + [b.world_size]
                  and all(abs(x - round(x)) < 0.02 for x in lasts))
    left = fitted - total
    tail = f"; {left} parameter(s) fit neither (split across groups)" if left else ""
    if local:
        return Signature("rank-local-boundary-microbatch", "each rank's parameter partition got its own rank's last "
                         f"(boundary) micro-batch x{b.world_size} and the other ranks' none: the boundary micro-batch "
                         "was added after the data-parallel all-reduce (never averaged over ranks); "
                         + "; ".join(parts) + tail, 0.0)
    return Signature("parameter-groups", "parameters fall into groups with different micro-batch weights: "
                     + "; ".join(parts) + tail, math.inf)


def fit_step(spec: Spec, grads: dict[str, torch.Tensor], ref: Record, step: int,
             previous: dict[str, torch.Tensor] | None) -> tuple[Fit, float | None]:
    """The micro-batch fit at one step, with the framework's previous-step gradient as one more column (its weight
    is 1 when gradients are not zeroed between steps, 0 otherwise)."""
    contribs, labels = _contributions(spec, ref, step)
    fraction = ref.meta.extra.get("contrib_sketch")
    if fraction:  # the reference kept sketched contributions: sketch the gradients the same way
        from .sketch import sketch

        grads = sketch(grads, float(fraction))
        previous = sketch(previous, float(fraction)) if previous is not None else None
    if previous is not None:
        fit = fit_weights(grads, [*contribs, previous], [*labels, "carried"])
        return Fit(fit.weights[:-1], fit.residual, fit.labels[:-1]), fit.weights[-1]
    return fit_weights(grads, contribs, labels), None


def _contributions(spec: Spec, ref: Record, step: int) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    b = spec.batch
    contribs, labels = [], []
    for r in range(b.world_size):
        for m in range(b.grad_accum):
            prefix = f"contrib/{step}/{r}/{m}/"
            contribs.append({k[len(prefix):]: v for k, v in ref.extras.items() if k.startswith(prefix)})
            labels.append(f"rank {r} mb {m}" if b.world_size > 1 else f"mb {m}")
    return contribs, labels


def fit_microbatches(spec: Spec, grads: dict[str, torch.Tensor], ref: Record, step: int) -> tuple[Fit, Signature]:
    fraction = ref.meta.extra.get("contrib_sketch")
    if fraction:  # the reference kept sketched contributions: sketch the framework's gradient the same way
        from .sketch import sketch

        grads = sketch(grads, float(fraction))
    contribs, labels = _contributions(spec, ref, step)
    fit = fit_weights(grads, contribs, labels)
    return fit, describe(fit, D.microbatch_token_counts(spec, step))
