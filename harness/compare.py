"""Comparison of one framework record against the reference record: per-step diffs, the verdict and its bound, the
first diverging step, parameters ranked by error, and the micro-batch weight fit at that step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from . import data as D
from .diff import DictDiff, dict_diff, scalar_rel, subtract
from .errors import WorkerError
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
    diverged: bool
    reasons: list[str] = field(default_factory=list)


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


def compare(spec: Spec, rec: Record, ref: Record, init: dict[str, torch.Tensor], bound: Bound, framework: str,
            version: str | None) -> RunResult:
    validate_record(spec, rec, ref)
    ub = bound.update_bound(spec.optimizer.name)
    steps = []
    before, before_ref = init, init
    for s in range(spec.batch.steps):
        st, rt = rec.steps[s], ref.steps[s]
        grad = dict_diff(st.grads, rt.grads)
        upd_fw = subtract(st.params, before)
        upd_ref = subtract(rt.params, before_ref)
        update = dict_diff(upd_fw, upd_ref)
        if spec.optimizer.lr > 0 and update.total.norm == 0.0 and update.total.ref_norm > 0:
            raise WorkerError(f"step {s}: the parameters did not change: the optimizer step did not happen")
        loss_rel = scalar_rel(st.loss, rt.loss)
        norm_rel = scalar_rel(st.grad_norm, rt.grad_norm)
        reasons = []
        if grad.total.rel > bound.value:
            reasons.append(f"gradient rel error {grad.total.rel:.3g} > {bound.value:.1e}")
        elif grad.per_param and grad.per_param[0].rel > bound.value:
            worst = grad.per_param[0]
            reasons.append(f"{worst.name} gradient rel error {worst.rel:.3g} > {bound.value:.1e}")
        if loss_rel is not None and loss_rel > bound.value:
            reasons.append(f"reported loss rel error {loss_rel:.3g}")
        if norm_rel is not None and norm_rel > bound.value:
            reasons.append(f"reported grad norm rel error {norm_rel:.3g}")
        if update.total.rel > ub:
            reasons.append(f"update rel error {update.total.rel:.3g} > {ub:.1e}")
        steps.append(StepComparison(s, st.loss, rt.loss, loss_rel, st.grad_norm, rt.grad_norm, norm_rel, grad, update,
                                    bool(reasons), reasons))
        before, before_ref = st.params, rt.params
    first = next((c.step for c in steps if c.diverged), None)
    fit_step = first if first is not None else 0
    fit = signature = None
    if any(k.startswith(f"contrib/{fit_step}/") for k in ref.extras):
        fit, signature = fit_microbatches(spec, rec.steps[fit_step].grads, ref, fit_step)
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
    result = RunResult(framework, version, "diverge" if diverged else "agree", "", bound, steps, first,
                       fit, fit_step, signature, supervision=supervision)
    if first is None:
        result.reason = f"max gradient rel error {result.max_rel_grad_error:.2g} <= bound {bound.value:.1e}"
    else:
        result.reason = f"step {first}: " + "; ".join(steps[first].reasons)
    if supervision:
        result.reason = "supervised tokens differ from the spec: " + "; ".join(supervision) + "; " + result.reason
    return result


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


def fit_microbatches(spec: Spec, grads: dict[str, torch.Tensor], ref: Record, step: int) -> tuple[Fit, Signature]:
    b = spec.batch
    fraction = ref.meta.extra.get("contrib_sketch")
    if fraction:  # the reference kept sketched contributions: sketch the framework's gradient the same way
        from .sketch import sketch

        grads = sketch(grads, float(fraction))
    contribs, labels = [], []
    for r in range(b.world_size):
        for m in range(b.grad_accum):
            prefix = f"contrib/{step}/{r}/{m}/"
            contribs.append({k[len(prefix):]: v for k, v in ref.extras.items() if k.startswith(prefix)})
            labels.append(f"rank {r} mb {m}" if b.world_size > 1 else f"mb {m}")
    fit = fit_weights(grads, contribs, labels)
    return fit, describe(fit, D.microbatch_token_counts(spec, step))
