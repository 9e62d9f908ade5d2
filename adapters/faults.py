"""The `faults` adapter: a self-test that reproduces failure modes, so the harness can prove it never passes them.

It computes the correct step with the reference's code, in the host's python, and then misbehaves as its `mode` knob
says (on every rank, or only on rank `rank`): crash (the process dies), hang (never answers), exception, nan (a NaN
gradient), missing (a parameter's gradient absent), zero-filled (a parameter's gradient replaced by zeros, as a
read-out that found none), no-step (parameters unchanged), or a synthetic numeric fault (scale the gradient, drop a
micro-batch, supervise pad tokens, decay weights whatever the learning rate) that must be caught as a divergence.
It wraps no framework; `stepdiff list` says so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stepdiff.harness.record import Record
from stepdiff.harness.spec import Spec, doc

from .base import Adapter, Capabilities, Unsupported, WorkerContext
from .reference import ReferenceAdapter


@dataclass(frozen=True)
class FaultKnobs:
    mode: Literal["none", "crash", "hang", "exception", "nan", "missing", "no-step", "scale", "drop",
                  "mask-first", "pad-supervised", "decay-without-lr", "zero-filled",
                  "unsupported"] = doc("none", "What goes wrong.")
    scale: float = doc(2.0, "mode=scale: factor applied to every gradient and update.")
    drop: int = doc(1, "mode=drop: index of the micro-batch (rank 0) whose contribution is removed.", minimum=0)
    rank: int = doc(-1, "Only this rank misbehaves (the others run correctly); -1 = every rank.", minimum=-1)


class FaultsAdapter(Adapter):
    name = "faults"
    host_env = True
    fuzz_knobs: dict[str, tuple[object, ...]] = {"mode": (), "scale": (), "drop": (), "rank": ()}  # the case picks
    capabilities = Capabilities(
        framework="none (self-test)",
        runs="the reference's own code, then a chosen failure: crash, hang, exception, NaN, missing gradient, "
             "skipped step, scaled gradient or dropped micro-batch",
        readouts=("as the reference",),
        knobs=("mode", "scale", "drop", "rank"),
        world_sizes="1, 2",
        pad_to=True,
        dtypes=("float32", "bfloat16"),
        loss_kinds=("sft", "policy", "value", "dpo"),
        notes=("Used by the test suite to prove that broken runs are errors and synthetic divergences are caught.",),
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
        rec = ReferenceAdapter().run(spec, init_path, ctx)
        rec.meta.adapter, rec.meta.code_path = self.name, f"faults mode={k.mode}"
        if k.mode == "decay-without-lr":  # weight decay applied at a fixed rate, not scaled by the learning rate
            for i, step in enumerate(rec.steps):
                step.params = {n: p * (1 - 1e-2) ** (i + 1) for n, p in step.params.items()}
            rec.extras = {}
            return rec
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
        elif k.mode in ("scale", "drop"):
            from safetensors.torch import load_file

            before = load_file(str(init_path))
            lr = spec.optimizer.lr
            for n in st.grads:
                if k.mode == "scale":
                    new = st.grads[n] * k.scale
                else:
                    new = st.grads[n] - rec.extras[f"contrib/0/0/{k.drop}/{n}"]
                if spec.optimizer.name == "sgd" and spec.optimizer.momentum == 0 and spec.optimizer.weight_decay == 0:
                    st.params[n] = before[n] - lr * new  # keep the update consistent with the faulty gradient
                st.grads[n] = new
            st.grad_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in st.grads.values())))
        rec.extras = {}
        return rec
