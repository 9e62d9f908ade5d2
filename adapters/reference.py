"""The pure-PyTorch reference: what the spec's optimizer steps should produce.

One process plays every rank: for each optimizer step it runs each (rank, micro-batch) in the spec's placement,
back-propagates that micro-batch's share of the step loss, and keeps that share's gradient separately (the
per-micro-batch contributions the signature fit uses). The step gradient is their sum; for `token-mean` each share is
sum(token CE in the micro-batch) / (supervised tokens in the whole step, all ranks). Then optional global-norm
clipping and torch's SGD or AdamW with a constant lr. Runs in fp32, bf16 or fp64 (fp64 measures the reference's own
rounding error for the tolerance).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.record import Record, RecordMeta, StepRecord
from stepdiff.harness.spec import Spec

from .base import Adapter, Capabilities, WorkerContext, build_model, framework_versions, make_optimizer


def sequence_shares(spec: Spec, mb: D.MicroBatch, per_token: Any, step_tokens: int, step_seqs: int) -> Any:
    """This micro-batch's share of the step loss under the spec's aggregation (the micro-batch shares sum to it)."""
    mask = mb.loss_mask[:, 1:].to(per_token.device).to(per_token.dtype)
    agg = spec.loss.aggregation
    if agg == "token-mean":
        return (per_token * mask).sum() / step_tokens
    per_seq = (per_token * mask).sum(dim=1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(dim=1).clamp(min=1)
    return per_seq.sum() / step_seqs


class ReferenceAdapter(Adapter):
    name = "reference"
    capabilities = Capabilities(
        framework="torch",
        runs="pure PyTorch: transformers LlamaForCausalLM forward, torch autograd, torch.optim.SGD/AdamW",
        readouts=("param.grad after each micro-batch backward (kept per micro-batch)", "loss and grad norm computed "
                  "exactly"),
        dtypes=("float32", "bfloat16", "float64"),
        world_sizes="any (one process plays every rank)",
    )

    def run(self, spec: Spec, init_path: Path, ctx: WorkerContext, dtype: str | None = None) -> Record:
        import torch

        t0 = time.perf_counter()
        dtype = dtype or spec.model.dtype
        model = build_model(spec, init_path, dtype).to(ctx.torch_device)
        model.train()
        names = [n for n, _ in model.named_parameters()]
        params = dict(model.named_parameters())
        opt = make_optimizer(spec, model.parameters())
        smp = D.samples(spec)
        b = spec.batch
        steps: list[StepRecord] = []
        extras: dict[str, torch.Tensor] = {}
        for s in range(b.steps):
            step_tokens = D.step_token_count(spec, s)
            step_seqs = b.world_size * b.grad_accum * b.micro_batch_size
            total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
            loss_total = 0.0
            for r in range(b.world_size):
                for m in range(b.grad_accum):
                    mb = D.collate(spec, D.micro_batch_indices(spec, s, r, m), smp)
                    model.zero_grad(set_to_none=True)
                    ids = mb.input_ids.to(ctx.torch_device)
                    logits = model(input_ids=ids, attention_mask=mb.attention_mask.to(ctx.torch_device)).logits
                    logits = logits[:, :-1].to(torch.float64 if dtype == "float64" else torch.float32)
                    per_token = torch.nn.functional.cross_entropy(
                        logits.transpose(1, 2), ids[:, 1:], reduction="none")
                    share = sequence_shares(spec, mb, per_token, step_tokens, step_seqs)
                    share.backward()
                    loss_total += float(share.detach())
                    for n, p in params.items():
                        g = p.grad if p.grad is not None else torch.zeros_like(p)
                        extras[f"contrib/{s}/{r}/{m}/{n}"] = g.detach().to(torch.float64 if dtype == "float64"
                                                                            else torch.float32).cpu().clone()
                        total[n] += g.detach().double()
            for n, p in params.items():
                p.grad = total[n].to(p.dtype)
            grads = {n: total[n].float().cpu() if dtype != "float64" else total[n].cpu() for n in names}
            norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in total.values())))
            if spec.optimizer.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optimizer.clip_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            after = {n: p.detach().cpu().clone() for n, p in params.items()}
            steps.append(StepRecord(loss=loss_total, grad_norm=norm, grads=grads, params=after))
        meta = RecordMeta(
            adapter=self.name, framework_version=torch.__version__, code_path=self.capabilities.runs,
            readout=self.capabilities.readouts[0], device=ctx.device, world_size=spec.batch.world_size, dtype=dtype,
            versions=framework_versions(), timings={"run_s": time.perf_counter() - t0},
        )
        return Record(meta=meta, steps=steps, extras=extras)
