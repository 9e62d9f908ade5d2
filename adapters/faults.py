"""The `faults` adapter: a self-test that reproduces failure modes, so the harness can prove it never passes them.

It runs the reference's own code, in the host's python, and misbehaves as its `mode` knob says.

On every rank, or only on rank `rank`. Broken runs (must be errors): crash (the process dies), hang (never
answers), exception, nan (a NaN gradient), missing (a parameter's gradient absent), zero-filled (a parameter's
gradient replaced by zeros, as a read-out that found none), no-step (parameters unchanged); unsupported (a knob the
installed release cannot take, found inside the worker).

Gradient faults (must diverge, with the micro-batch / token signature): scale (every step's gradient, reported and
used, times `scale`: 1.02 is the "2 % gradient error" a bf16 check must catch), drop (a micro-batch's contribution
removed from step 0's reported gradient), mask-first (the first response token never a target), pad-supervised
(labels not masked at padding: pad tokens become targets), carry (gradients not zeroed between steps: each step's
gradient, reported and used, includes the previous one's); decay-without-lr (parameters decayed at a fixed rate
whatever the lr: caught even at lr 0).

Optimizer and precision faults (the gradient is right, the step that turns it into new weights is not; must diverge
update-only, named by optimizer isolation): no-weight-decay, decay-excluded (decay also on optimizer.no_decay
parameters), lr-scale (lr times `scale`), no-bias-correction, step-offset (Adam's step counter one ahead),
eps-inside-sqrt, eps-before-bias-correction, clip-max (clip coefficient max(1, c/norm) instead of min), no-clip
(clipping not applied), carry-hidden (the optimizer sees gradients carried across steps while the read-out shows
fresh ones), loss-scale (the optimizer divides gradients by 2^16, a loss scale never applied), and loss-report
(only the reported loss is `scale` times off: loss-only). The faulty optimizer is the spec's written out in float64
(harness.optim) with one thing changed.
It wraps no framework; `stepdiff list` says so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stepdiff.harness.record import Record
from stepdiff.harness.spec import Spec, doc

from .base import Adapter, Capabilities, Unsupported, WorkerContext
from .reference import ReferenceAdapter

FaultMode = Literal["none", "crash", "hang", "exception", "nan", "missing", "no-step", "scale", "drop", "mask-first",
                    "pad-supervised", "decay-without-lr", "carry", "no-weight-decay", "decay-excluded", "lr-scale",
                    "no-bias-correction", "step-offset", "eps-inside-sqrt", "eps-before-bias-correction", "clip-max",
                    "no-clip", "carry-hidden", "loss-scale", "loss-report", "zero-filled", "unsupported"]

OPTIMIZER_MODES = ("no-weight-decay", "decay-excluded", "lr-scale", "no-bias-correction", "step-offset",
                   "eps-inside-sqrt", "eps-before-bias-correction", "clip-max", "no-clip", "carry-hidden",
                   "loss-scale")


@dataclass(frozen=True)
class FaultKnobs:
    mode: FaultMode = doc("none", "What goes wrong.")
    scale: float = doc(2.0, "mode=scale: factor on every gradient; lr-scale: factor on the lr; loss-report: factor "
                            "on the reported loss.")
    drop: int = doc(1, "mode=drop: index of the micro-batch (rank 0) whose contribution is removed.", minimum=0)
    rank: int = doc(-1, "Only this rank misbehaves (the others run correctly); -1 = every rank.", minimum=-1)


def variant_for(k: FaultKnobs, spec: Spec) -> Any:
    """The harness.optim Variant of an optimizer-fault mode."""
    from stepdiff.harness import optim

    v = optim.Variant
    m = k.mode
    if m == "no-weight-decay":
        return v(decay="none")
    if m == "decay-excluded":
        return v(decay="all")
    if m == "lr-scale":
        return v(lr_scale=k.scale)
    if m == "no-bias-correction":
        return v(bias_correction=False)
    if m == "step-offset":
        return v(step_offset=1)
    if m == "eps-inside-sqrt":
        return v(eps="inside-sqrt")
    if m == "eps-before-bias-correction":
        return v(eps="before-bias-correction")
    return optim.CORRECT  # the modes below change the gradient the optimizer gets, not the optimizer


class FaultyReference(ReferenceAdapter):
    """The reference with one piece of its step broken on purpose."""

    def __init__(self, knobs: FaultKnobs) -> None:
        self.k = knobs
        self.carried: dict[str, Any] | None = None
        self.opt_state: Any = None

    def _gradients(self, spec: Spec, s: int, total: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        m = self.k.mode
        if m == "scale":
            scaled = {n: t * self.k.scale for n, t in total.items()}
            return scaled, scaled
        if m in ("carry", "carry-hidden"):
            self.carried = dict(total) if self.carried is None else {n: self.carried[n] + t for n, t in total.items()}
            return (self.carried if m == "carry" else total), self.carried
        return total, total

    def _make_optimizer(self, spec: Spec, master: dict[str, Any]) -> Any:
        if self.k.mode not in OPTIMIZER_MODES:
            return super()._make_optimizer(spec, master)
        from stepdiff.harness import optim

        self.opt_state = optim.State()
        return None

    def _optimizer_step(self, spec: Spec, s: int, opt: Any, master: dict[str, Any],
                        used: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], int | None]:
        if opt is not None:
            return super()._optimizer_step(spec, s, opt, master, used)
        import torch

        from stepdiff.harness import optim

        variant = variant_for(self.k, spec)
        if self.k.mode in ("clip-max", "no-clip", "loss-scale"):
            norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in used.values())))
            c = spec.optimizer.clip_grad_norm
            coef = {"clip-max": max(1.0, c / (norm + optim.CLIP_EPS)) if c > 0 else 1.0, "no-clip": 1.0,
                    "loss-scale": optim.clip_coefficient(used, c) / 65536.0}[self.k.mode]
            variant = optim.Variant(grad_scale=tuple([1.0] * s + [coef]))
        before = {n: p.detach() for n, p in master.items()}
        new, self.opt_state, _ = optim.step(spec.optimizer, before, used, self.opt_state, s, variant)
        with torch.no_grad():
            for n, p in master.items():
                p.copy_(new[n].to(p.dtype))
        state = {n: {k: t.float().cpu().clone() for k, t in kv.items()} for n, kv in self.opt_state.tensors.items()}
        return state, self.opt_state.step


class FaultsAdapter(Adapter):
    name = "faults"
    host_env = True
    fuzz_knobs: dict[str, tuple[object, ...]] = {"mode": (), "scale": (), "drop": (), "rank": ()}  # the case picks
    capabilities = Capabilities(
        framework="none (self-test)",
        runs="the reference's own code, then a chosen failure: crash, hang, exception, NaN, missing gradient, "
             "skipped step, a gradient fault (scaled, dropped micro-batch, mask off-by-one, carried across steps) "
             "or an optimizer/precision fault (weight decay, lr, bias correction, step counter, eps, clipping, "
             "loss scale, reported loss)",
        readouts=("as the reference",),
        knobs=("mode", "scale", "drop", "rank"),
        world_sizes="1, 2",
        pad_to=True,
        dtypes=("float32", "bfloat16", "float16"),
        loss_kinds=("sft", "policy", "value", "dpo"),
        notes=("Used by the test suite to prove that broken runs are errors and synthetic divergences are caught "
               "and named.",),
    )

    def run(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Record:
        import torch

        k: FaultKnobs = spec.knobs_for(self.name)
        if k.rank >= 0 and ctx.rank != k.rank:
            k = FaultKnobs()  # this rank behaves
        if k.mode == "crash":
            print("faults: simulated crash of the framework process", flush=True)
            os._exit(3)
        if k.mode == "hang":
            print("faults: simulated hang", flush=True)
            time.sleep(10**6)
        if k.mode == "unsupported":  # a knob the installed release cannot take, found inside the worker
            raise Unsupported("faults: simulated knob this release cannot take")
        if k.mode == "exception":
            raise RuntimeError("faults: simulated framework exception")
        if k.mode == "mask-first":  # an off-by-one loss mask: the first response token is never a target
            from stepdiff.harness import data as D
            from stepdiff.harness.spec import Sample

            moved = tuple(Sample(prompt=(*x.prompt, x.response[0]), response=x.response[1:] or x.response)
                          for x in D.samples(spec))
            rec = ReferenceAdapter().run(spec.replace(data__samples=moved), init_path, ctx)
            rec.extras = {}
            return rec
        if k.mode == "pad-supervised":  # labels not masked at padding: pad tokens become targets
            from stepdiff.harness import data as D

            collate = D.collate

            def leaky(*a: object, **kw: object) -> D.MicroBatch:
                mb = collate(*a, **kw)  # type: ignore[arg-type]
                mb.loss_mask = mb.loss_mask.clone()
                mb.loss_mask[:, 1:][mb.attention_mask[:, 1:] == 0] = 1
                return mb

            D.collate = leaky  # type: ignore[assignment]
            try:
                rec = ReferenceAdapter().run(spec, init_path, ctx)
            finally:
                D.collate = collate  # type: ignore[assignment]
            rec.extras = {}
            return rec
        rec = FaultyReference(k).run(spec, init_path, ctx)
        rec.meta.adapter, rec.meta.code_path = self.name, f"faults mode={k.mode}"
        if k.mode == "decay-without-lr":  # weight decay applied at a fixed rate, not scaled by the learning rate
            for i, step in enumerate(rec.steps):
                step.params = {n: p * (1 - 1e-2) ** (i + 1) for n, p in step.params.items()}
            rec.extras = {}
            return rec
        if k.mode in OPTIMIZER_MODES:
            rec.meta.optimizer = f"harness.optim float64 {spec.optimizer.name} with the fault '{k.mode}'"
        st = rec.steps[0]
        name = next(iter(st.grads))
        if k.mode == "nan":
            st.grads[name][0] = float("nan")
        elif k.mode == "missing":
            del st.grads[name]
        elif k.mode == "zero-filled":  # a read-out that found no gradient and wrote zeros in its place
            st.grads[name] = torch.zeros_like(st.grads[name])
        elif k.mode == "no-step":
            from safetensors.torch import load_file

            init = load_file(str(init_path))
            st.params = {n: init[n].clone() for n in st.params}
        elif k.mode == "loss-report":
            for x in rec.steps:
                x.loss *= k.scale
        elif k.mode == "drop":
            from safetensors.torch import load_file

            before = load_file(str(init_path))
            lr = spec.optimizer.lr
            for n in st.grads:
                new = st.grads[n] - rec.extras[f"contrib/0/0/{k.drop}/{n}"]
                if spec.optimizer.name == "sgd" and spec.optimizer.momentum == 0 and spec.optimizer.weight_decay == 0:
                    st.params[n] = before[n] - lr * new  # keep the update consistent with the faulty gradient
                st.grads[n] = new
            st.grad_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in st.grads.values())))
        rec.extras = {}
        return rec
