"""The pure-PyTorch reference: what the spec's optimizer steps should produce.

One process plays every rank: for each optimizer step it runs each (rank, micro-batch) in the spec's placement,
back-propagates that micro-batch's share of the step loss, and keeps that share's gradient separately (the
per-micro-batch contributions the signature fit uses). The step gradient is their sum. Then optional global-norm
clipping and torch's SGD or AdamW with a constant lr (parameters matching optimizer.no_decay in a decay-0 group).
Runs in fp32, bf16, fp16 or fp64 (fp64 measures the reference's own rounding error for the tolerance); in bf16/fp16
the optimizer keeps float32 master weights and state, as mixed-precision frameworks do. Records the optimizer state
after every step. With a teacher record it replays another run's parameter trajectory (teacher forcing) to give the
gradients at that run's own parameters.

Losses (per supervised target token t, with the logits of position t-1):
- sft:    cross-entropy of token t.
- policy: PPO/GRPO surrogate at ratio 1 (old log-probs = current ones): -A * exp(logp_t - stopgrad(logp_t)), so the
          gradient is -A * grad(logp_t); A from `data.sample_advantages` (given, or group-normalised rewards). KL and
          entropy terms are 0. Truncated samples get no loss when rl.mask_truncated is set.
- value:  0.5 * (V_t - R)^2 with V_t the `score` head at position t-1 and R = Sample.value_target (value clipping
          cannot act when old values equal current ones).
- dpo:    -log sigmoid(beta * ((logp(chosen) - ref(chosen)) - (logp(rejected) - ref(rejected)))) per pair, with
          summed response log-probs and the initial weights as the frozen reference policy; mean over the step's pairs.
Aggregation over the whole optimizer step (`loss.aggregation`): token-mean = sum / supervised tokens of the step;
seq-mean-token-mean = mean over sequences of each sequence's token mean; seq-mean-token-sum = mean over sequences of
token sums; seq-mean-token-sum-norm = mean over sequences of token sums / rl.max_response_len (or the longest
response of the step).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.record import Record, RecordMeta, StepRecord
from stepdiff.harness.spec import Spec

from .base import Adapter, Capabilities, WorkerContext
from .common import build_model, framework_versions, make_optimizer, param_groups, read_state

LOSS_SCALE = {"float16": 4096.0}
"""float16 gradients of a tiny model underflow without a loss scale: a static one, undone in float64 right after
the backward (a non-finite gradient then fails the run as any NaN does)."""


def aggregate(spec: Spec, per_token: Any, mask: Any, norms: D.StepNorms) -> Any:
    """This micro-batch's share of the step loss (the shares of all micro-batches and ranks sum to the step loss)."""
    agg = spec.loss.aggregation
    if agg == "token-mean":
        return (per_token * mask).sum() / max(norms.tokens, 1)
    per_seq = (per_token * mask).sum(dim=1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(dim=1).clamp(min=1)
    elif agg == "seq-mean-token-sum-norm":
        per_seq = per_seq / norms.max_response_len
    return per_seq.sum() / norms.sequences


class ReferenceAdapter(Adapter):
    name = "reference"
    host_env = True  # runs in the host's python: needs only torch and transformers
    capabilities = Capabilities(
        framework="torch",
        runs="pure PyTorch: transformers LlamaForCausalLM / LlamaForTokenClassification forward, the spec's loss "
             "written out (sft, policy, value, dpo), torch autograd, torch.optim.SGD/AdamW",
        readouts=("param.grad after each micro-batch backward (kept per micro-batch)",
                  "loss and grad norm computed exactly", "optimizer state: torch optimizer.state after each step"),
        dtypes=("float32", "bfloat16", "float16", "float64"),
        world_sizes="any (one process plays every rank)",
        loss_kinds=("sft", "policy", "value", "dpo"),
        pad_to=True,
    )

    def setup(self, ctx: WorkerContext) -> None:
        """Import what every request uses at start-up (about 4 CPU-seconds), so that a worker started ahead of its first
        request (a cached reference's teacher-forced replay, stepdiff.harness.schedule.References.warm) is ready to
        compute when the framework's record comes in, not ready to import."""
        import torch  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401

    def run(self, spec: Spec, init_path: Path, ctx: WorkerContext, dtype: str | None = None,
            token_step: int | None = None, contributions: bool = True, contrib_sketch: float | None = None,
            teacher: str | None = None) -> Record:
        """The spec's steps. With `token_step`, also the per-token contributions of that step (extras
        `tok/<sample>/<t>/<name>`, for every target position t >= 1, supervised or not, and t = len(sample): a
        padding token predicted after the last one), for the token-level fit.
        `contributions=False` keeps no per-micro-batch contributions; `contrib_sketch` keeps them as seeded
        coordinate samples of that fraction (real-size models, see harness/sketch.py).

        With `teacher` (a record directory), every step s >= 1 starts from the teacher's parameters after step s-1
        instead of this run's own (teacher forcing): the gradients, contributions, loss and norm are those at the
        teacher's parameters, and no optimizer runs (the record's parameters are the teacher's)."""
        import torch

        from stepdiff.harness.sketch import sketch_one

        t0 = time.perf_counter()
        dtype = dtype or spec.model.dtype
        acc = torch.float64 if dtype == "float64" else torch.float32
        model = build_model(spec, init_path, dtype).to(ctx.torch_device)
        model.train()
        frozen = None
        if spec.loss.kind == "dpo":  # the frozen reference policy: the initial weights
            frozen = build_model(spec, init_path, dtype).to(ctx.torch_device).eval()
            frozen.requires_grad_(False)
        params = dict(model.named_parameters())
        teacher_rec = Record.load(teacher) if teacher else None
        # low precision trains like every mixed-precision framework: float32 master weights and optimizer state, the
        # model's low-precision parameters re-rounded from them after each step
        master = params if dtype in ("float32", "float64") else {
            n: torch.nn.Parameter(p.detach().float().clone()) for n, p in params.items()}
        opt = None if teacher_rec else self._make_optimizer(spec, master)
        smp = D.samples(spec)
        adv = D.sample_advantages(spec) if spec.loss.kind == "policy" else []
        b = spec.batch
        steps: list[StepRecord] = []
        extras: dict[str, torch.Tensor] = {}
        for s in range(b.steps):
            if teacher_rec is not None and s > 0:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(teacher_rec.steps[s - 1].params[n].to(p.dtype))
            norms = D.step_norms(spec, s)
            total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
            loss_total = 0.0
            for r in range(b.world_size):
                for m in range(b.grad_accum):
                    idx = D.micro_batch_indices(spec, s, r, m)
                    if token_step == s:
                        extras.update(self._token_contributions(spec, model, idx, smp, norms, ctx, acc))
                    model.zero_grad(set_to_none=True)
                    share = self._share(spec, model, frozen, idx, smp, adv, norms, ctx, acc)
                    (share * LOSS_SCALE.get(dtype, 1.0)).backward()
                    loss_total += float(share.detach())
                    for n, p in params.items():
                        g = p.grad if p.grad is not None else torch.zeros_like(p)
                        if token_step is None and contributions:
                            c = g.detach() if contrib_sketch is None else sketch_one(n, g.detach(), contrib_sketch)
                            extras[f"contrib/{s}/{r}/{m}/{n}"] = (c.to(acc) / LOSS_SCALE.get(dtype, 1.0)).cpu().clone()
                        total[n] += g.detach().double() / LOSS_SCALE.get(dtype, 1.0)
            model.zero_grad(set_to_none=True)
            reported, used = self._gradients(spec, s, total)
            # clone: .to() of a same-dtype tensor is no copy (fp64), and the optimizer works in place
            grads = {n: t.to(acc).cpu().clone() for n, t in reported.items()}
            norm = float(torch.stack([(g ** 2).sum() for g in reported.values()]).sum().sqrt())
            state: dict[str, dict[str, torch.Tensor]] = {}
            opt_step = None
            if teacher_rec is not None:
                after = {n: t.clone() for n, t in teacher_rec.steps[s].params.items()}
            else:
                state, opt_step = self._optimizer_step(spec, s, opt, master, used)
                if master is not params:
                    with torch.no_grad():
                        for n, p in params.items():
                            p.copy_(master[n].to(p.dtype))
                after = {n: p.detach().cpu().clone() for n, p in params.items()}
            steps.append(StepRecord(loss=loss_total, grad_norm=norm, grads=grads, params=after, state=state,
                                    opt_step=opt_step))
        meta = RecordMeta(
            adapter=self.name, framework_version=torch.__version__, code_path=self.capabilities.runs,
            readout=self.capabilities.readouts[0], device=ctx.device, world_size=spec.batch.world_size, dtype=dtype,
            versions=framework_versions(), timings={"run_s": time.perf_counter() - t0},
            extra={"step_norms": [vars(D.step_norms(spec, s)) for s in range(b.steps)],
                   "contrib_sketch": contrib_sketch, **({"teacher": teacher} if teacher else {})},
            optimizer=f"torch.optim.{'SGD' if spec.optimizer.name == 'sgd' else 'AdamW'} on float32 master weights"
            if master is not params else f"torch.optim.{'SGD' if spec.optimizer.name == 'sgd' else 'AdamW'}",
            sources={"loss": "framework", "grad_norm": "framework", "state": "framework"},
        )
        return Record(meta=meta, steps=steps, extras=extras)

    # The step's gradient -> optimizer path, as overridable pieces (the `faults` adapter breaks them on purpose).

    def _make_optimizer(self, spec: Spec, master: dict[str, Any]) -> Any:
        """torch's SGD or AdamW over the master weights, with optimizer.no_decay parameters in a decay-0 group."""
        return make_optimizer(spec, param_groups(spec, master))

    def _gradients(self, spec: Spec, s: int, total: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the gradient reported for step s, the gradient the optimizer gets): both the float64 step sum here."""
        return total, total

    def _optimizer_step(self, spec: Spec, s: int, opt: Any, master: dict[str, Any],
                        used: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], int | None]:
        """Clip (torch's clip_grad_norm_) and step; returns the optimizer state after the step, per parameter."""
        import torch

        for n, p in master.items():
            p.grad = used[n].to(p.dtype).clone()
        if spec.optimizer.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(master.values()), spec.optimizer.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return read_state(opt, master)

    def _share(self, spec: Spec, model: Any, frozen: Any, idx: list[int], smp: tuple[D.Sample, ...],
               adv: list[float], norms: D.StepNorms, ctx: WorkerContext, acc: Any) -> Any:
        import torch

        dev = ctx.torch_device
        kind = spec.loss.kind
        if kind == "dpo":
            return self._dpo_share(spec, model, frozen, idx, smp, norms, ctx, acc)
        mb = D.collate(spec, idx, smp)
        ids = mb.input_ids.to(dev)
        out = model(input_ids=ids, attention_mask=mb.attention_mask.to(dev)).logits[:, :-1].to(acc)
        keep = torch.tensor([1.0 if D.included(spec, smp[i]) else 0.0 for i in idx], dtype=acc, device=dev)
        mask = mb.loss_mask[:, 1:].to(dev).to(acc) * keep[:, None]
        if kind == "value":
            target = torch.tensor([smp[i].value_target for i in idx], dtype=acc, device=dev)[:, None]
            per_token = 0.5 * (out[..., 0] - target) ** 2
        else:
            ce = torch.nn.functional.cross_entropy(out.transpose(1, 2), ids[:, 1:], reduction="none")
            if kind == "sft":
                per_token = ce
            else:  # policy, ratio 1
                logp = -ce
                a = torch.tensor([adv[i] for i in idx], dtype=acc, device=dev)[:, None]
                per_token = -a * torch.exp(logp - logp.detach())
        return aggregate(spec, per_token, mask, norms)

    def _token_contributions(self, spec: Spec, model: Any, idx: list[int], smp: tuple[D.Sample, ...],
                             norms: D.StepNorms, ctx: WorkerContext, acc: Any) -> dict[str, Any]:
        """Gradient of each target token's loss, scaled by the weight a supervised token has in the correct
        aggregation (so a correct framework's token weights are 1 on supervised targets and 0 elsewhere)."""
        import torch

        out: dict[str, Any] = {}
        params = dict(model.named_parameters())
        for i in idx:
            mb = D.collate(spec, [i], smp)
            ids = mb.input_ids.to(ctx.torch_device)
            logits = model(input_ids=ids, attention_mask=mb.attention_mask.to(ctx.torch_device)).logits[0]
            # targets 1..L-1, then data.pad_id after the last token (a framework that trains on padding)
            targets = torch.cat([ids[0, 1:], ids.new_full((1,), spec.data.pad_id)])
            ce = torch.nn.functional.cross_entropy(logits.to(acc), targets, reduction="none")
            n_sup = max(int(mb.loss_mask.sum()), 1)
            agg = spec.loss.aggregation
            scale = (1.0 / max(norms.tokens, 1) if agg == "token-mean" else
                     1.0 / (norms.sequences * n_sup) if agg == "seq-mean-token-mean" else
                     1.0 / (norms.sequences * norms.max_response_len) if agg == "seq-mean-token-sum-norm" else
                     1.0 / norms.sequences)
            for t in range(1, ids.shape[1] + 1):
                grads = torch.autograd.grad(ce[t - 1] * scale, list(params.values()), retain_graph=True,
                                            allow_unused=True)
                for n, g in zip(params, grads, strict=True):
                    out[f"tok/{i}/{t}/{n}"] = (g if g is not None else torch.zeros_like(params[n])).detach().to(
                        acc).cpu().clone()
        return out

    def _dpo_share(self, spec: Spec, model: Any, frozen: Any, idx: list[int], smp: tuple[D.Sample, ...],
                   norms: D.StepNorms, ctx: WorkerContext, acc: Any) -> Any:
        import torch

        def seq_logp(net: Any, which: str) -> Any:
            mb = D.collate(spec, idx, smp, which=which)
            ids = mb.input_ids.to(ctx.torch_device)
            logits = net(input_ids=ids, attention_mask=mb.attention_mask.to(ctx.torch_device)).logits[:, :-1].to(acc)
            logp = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            return (logp * mb.loss_mask[:, 1:].to(ctx.torch_device).to(acc)).sum(dim=1)

        with torch.no_grad():
            ref_c, ref_r = seq_logp(frozen, "response"), seq_logp(frozen, "rejected")
        margin = (seq_logp(model, "response") - ref_c) - (seq_logp(model, "rejected") - ref_r)
        losses = -torch.nn.functional.logsigmoid(spec.rl.dpo_beta * margin)
        return losses.sum() / norms.sequences
