"""DeepSpeed's engine driven directly: `deepspeed.initialize(model, optimizer=torch SGD/AdamW, config)` and the
engine's own `forward`, `backward` (its gradient-accumulation scaling, ZeRO reduce/partition, CPU offload
accumulation) and `step` (boundary detection, unscale/clip, optimizer step, ZeRO all-gather). The driver only feeds
micro-batches and computes the spec's loss: each micro-batch loss is sum(token CE) / (supervised tokens of the whole
step, all ranks) x grad_accum x world_size, which DeepSpeed's 1/grad_accum scaling and data-parallel averaging turn
into one global token mean when DeepSpeed is correct.

Read-outs: `readouts.deepspeed_grads` after the boundary micro-batch's backward and before its `step()`; with plain
SGD (no momentum/decay/clipping) the parameter delta / lr cross-checks it (meta.extra['readout_crosscheck_max_abs']);
grad norm `engine.get_global_grad_norm()`; loss: the per-step sum of the fed losses, all-reduced over ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import Driven, WorkerContext
from ..common import build_model, make_optimizer, token_loss_sum
from ..readouts import deepspeed_grads, deepspeed_params
from .knobs import DeepSpeedKnobs

CODE_PATH = ("deepspeed.init_distributed + deepspeed.initialize(model, torch optimizer, config) + "
             "DeepSpeedEngine.forward/backward/step (ZeRO 0-3, offload_optimizer, overlap_comm, gradient accumulation)")
READOUT = "gradients: deepspeed.utils.safe_get_full_grad before the boundary step()"


def ds_config(spec: Spec, k: DeepSpeedKnobs) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": k.zero_stage, "overlap_comm": k.overlap_comm,
                            "contiguous_gradients": k.contiguous_gradients,
                            "reduce_bucket_size": k.reduce_bucket_size,
                            "allgather_bucket_size": k.allgather_bucket_size}
    if k.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": k.offload_optimizer}
    return {
        "train_micro_batch_size_per_gpu": spec.batch.micro_batch_size,
        "gradient_accumulation_steps": spec.batch.grad_accum,
        "train_batch_size": spec.samples_per_step,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # explicit: the default changed from 0.0 to 1.0 in 0.19.3
        "gradient_clipping": float(spec.optimizer.clip_grad_norm),
        "bf16": {"enabled": spec.model.dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: DeepSpeedKnobs) -> Driven:
    import deepspeed
    import torch
    import torch.distributed as dist

    b, o = spec.batch, spec.optimizer
    model = build_model(spec, init_path).to(ctx.torch_device)
    model.train()
    config = ds_config(spec, k)
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(spec, model.parameters()), config=config)
    names = [n for n, _ in engine.module.named_parameters()]
    smp = D.samples(spec)
    plain_sgd = o.name == "sgd" and o.momentum == 0 and o.lr > 0 and o.weight_decay == 0 and o.clip_grad_norm == 0
    steps: list[StepRecord] = []
    crosscheck = 0.0
    before = deepspeed_params(engine)
    for s in range(b.steps):
        n_step = D.step_token_count(spec, s)
        loss_sum = torch.zeros((), dtype=torch.float64)
        grads: dict[str, torch.Tensor] = {}
        for m in range(b.grad_accum):
            mb = D.collate(spec, D.micro_batch_indices(spec, s, ctx.rank, m), smp)
            ce_sum, _ = token_loss_sum(engine, mb, ctx.torch_device)
            engine.backward(ce_sum / n_step * (b.grad_accum * b.world_size))
            loss_sum += float(ce_sum.detach()) / n_step
            if m == b.grad_accum - 1:  # after accumulation, before the boundary step (and its clipping)
                grads = deepspeed_grads(engine)
            engine.step()
        total = loss_sum.to(ctx.torch_device)
        if dist.is_initialized() and ctx.world_size > 1:
            dist.all_reduce(total)
        norm = engine.get_global_grad_norm()
        after = deepspeed_params(engine)
        if plain_sgd:
            for name in names:
                delta = (before[name] - after[name]) / o.lr
                crosscheck = max(crosscheck, float((delta - grads[name]).abs().max()))
        before = after
        steps.append(StepRecord(loss=float(total), grad_norm=None if norm is None else float(norm), grads=grads,
                                params=after))
    if hasattr(engine, "destroy"):
        engine.destroy()
    return Driven(steps=steps, framework_version=deepspeed.__version__, code_path=CODE_PATH, readout=READOUT,
                  extra={"ds_config": config, "readout_crosscheck_max_abs": crosscheck if plain_sgd else None})
