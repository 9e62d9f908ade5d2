"""DeepSpeed's engine driven directly: `deepspeed.initialize(model, model_parameters, config)` with DeepSpeed's
own optimizer built from the config's `optimizer` block (knob optimizer_source = "config", the default: AdamW ->
DeepSpeedCPUAdam under CPU offload, FusedAdam otherwise; SGD through DeepSpeed's torch fallback), its precision
wrappers chosen from the config (`bf16`, `data_types.grad_accum_dtype`: FP16_Optimizer/BF16_Optimizer/ZeRO) and
its own clipping (`gradient_clipping`); or a torch optimizer handed in (optimizer_source = "torch"). Then the
engine's own `forward`, `backward` (its gradient-accumulation scaling, ZeRO reduce/partition, CPU offload
accumulation) and `step` (boundary detection, unscale/clip, optimizer step, ZeRO all-gather). The driver only feeds
micro-batches and computes the spec's loss: each micro-batch loss is sum(token CE) / (supervised tokens of the whole
step, all ranks) x world_size (x grad_accum when DeepSpeed's config accumulates, to undo its 1/grad_accum), which
DeepSpeed's data-parallel averaging turns into one global token mean when DeepSpeed is correct. With accumulation =
"boundary-calls" the config says gradient_accumulation_steps = 1 and the driver calls backward() grad_accum times per
step with set_gradient_accumulation_boundary(False, ..., True) and step() once.
Parameter groups: optimizer.no_decay parameters in a weight_decay 0 group (model_parameters), as DeepSpeed users do.

Read-outs: `readouts.deepspeed_grads` after the boundary micro-batch's backward and before its `step()`; with plain
SGD (no momentum/decay/clipping) the parameter delta / lr cross-checks it (meta.extra['readout_crosscheck_max_abs']);
grad norm `engine.get_global_grad_norm()`; optimizer state `readouts.deepspeed_state` (safe_get_full_optimizer_state:
Adam's exp_avg/exp_avg_sq gathered across partitions and from CPU offload) and the step counter; loss: the per-step sum
of the fed losses, all-reduced over ranks (fed by the driver: recorded as such, never compared).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import Driven, WorkerContext
from ..common import build_model, make_optimizer, param_groups, token_loss_sum
from ..readouts import (
    deepspeed_grads,
    deepspeed_master_params,
    deepspeed_optimizer,
    deepspeed_params,
    deepspeed_state,
)
from .knobs import DeepSpeedKnobs

CODE_PATH = ("deepspeed.init_distributed + deepspeed.initialize(model, model_parameters, config with its optimizer "
             "block) + DeepSpeedEngine.forward/backward/step (ZeRO 0-3, offload_optimizer, overlap_comm, gradient "
             "accumulation, bf16 wrappers, DeepSpeed's optimizer and clipping)")
TORCH_CODE_PATH = CODE_PATH.replace("model_parameters, config with its optimizer block",
                                    "torch optimizer handed in from outside, config")
READOUT = "gradients: deepspeed.utils.safe_get_full_grad before the boundary step()"


def optimizer_block(spec: Spec) -> dict[str, Any]:
    """The config's `optimizer` block for the spec's optimizer, as a DeepSpeed user writes it."""
    o = spec.optimizer
    if o.name == "sgd":
        return {"type": "SGD", "params": {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay}}
    return {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                        "weight_decay": o.weight_decay}}


def state_keys(spec: Spec) -> tuple[str, ...]:
    """The optimizer-state entries the spec's optimizer keeps (asked of every rank: a collective under ZeRO)."""
    o = spec.optimizer
    return ("exp_avg", "exp_avg_sq") if o.name == "adamw" else ("momentum_buffer",) if o.momentum else ()


def ds_config(spec: Spec, k: DeepSpeedKnobs) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": k.zero_stage, "overlap_comm": k.overlap_comm,
                            "contiguous_gradients": k.contiguous_gradients,
                            "reduce_bucket_size": k.reduce_bucket_size,
                            "allgather_bucket_size": k.allgather_bucket_size}
    if k.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": k.offload_optimizer}
    ga = spec.batch.grad_accum if k.accumulation == "engine" else 1
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.batch.micro_batch_size,
        "gradient_accumulation_steps": ga,
        "train_batch_size": spec.batch.micro_batch_size * ga * spec.batch.world_size,
        "zero_optimization": zero,
        # SGD (and a handed-in torch optimizer) is "untested" for ZeRO, and runs under offload only when DeepSpeed
        # is not forced to its CPU Adam; neither flag changes the optimizer DeepSpeed builds for AdamW
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # explicit: the default changed from 0.0 to 1.0 in 0.19.3
        "gradient_clipping": float(spec.optimizer.clip_grad_norm),
        "bf16": {"enabled": spec.model.dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if k.optimizer_source == "config":
        cfg["optimizer"] = optimizer_block(spec)
    if k.grad_accum_dtype != "default":
        cfg["data_types"] = {"grad_accum_dtype": k.grad_accum_dtype}
    return cfg


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: DeepSpeedKnobs) -> Driven:
    import deepspeed
    import torch
    import torch.distributed as dist

    b, o = spec.batch, spec.optimizer
    model = build_model(spec, init_path).to(ctx.torch_device)
    model.train()
    config = ds_config(spec, k)
    groups = param_groups(spec, model.named_parameters())
    if k.optimizer_source == "config":
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
        built_by = "built by DeepSpeed from the config's optimizer block"
    else:
        engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(spec, groups), config=config)
        built_by = "a torch optimizer handed to deepspeed.initialize by the adapter (optimizer_source = 'torch')"
    names = [n for n, _ in engine.module.named_parameters()]
    smp = D.samples(spec)
    plain_sgd = o.name == "sgd" and o.momentum == 0 and o.lr > 0 and o.weight_decay == 0 and o.clip_grad_norm == 0
    manual = k.accumulation == "boundary-calls"
    per_loss = b.world_size * (1 if manual else b.grad_accum)  # undo DeepSpeed's 1/GA only where it applies it
    keys = state_keys(spec)
    steps: list[StepRecord] = []
    crosscheck = 0.0
    masters = deepspeed_master_params(engine) is not None  # low precision: record the float32 master weights

    def params() -> dict[str, Any]:
        return (deepspeed_master_params(engine) or {}) if masters else deepspeed_params(engine)

    before = params()
    for s in range(b.steps):
        n_step = D.step_token_count(spec, s)
        loss_sum = torch.zeros((), dtype=torch.float64)
        grads: dict[str, torch.Tensor] = {}
        for m in range(b.grad_accum):
            last = m == b.grad_accum - 1
            if manual:
                engine.set_gradient_accumulation_boundary(last)
            mb = D.collate(spec, D.micro_batch_indices(spec, s, ctx.rank, m), smp)
            ce_sum, _ = token_loss_sum(engine, mb, ctx.torch_device)
            engine.backward(ce_sum / n_step * per_loss)
            loss_sum += float(ce_sum.detach()) / n_step
            if last:  # after accumulation, before the boundary step (and its clipping)
                grads = deepspeed_grads(engine)
            if not manual or last:
                engine.step()
        total = loss_sum.to(ctx.torch_device)
        if dist.is_initialized() and ctx.world_size > 1:
            dist.all_reduce(total)
        norm = engine.get_global_grad_norm()
        after = params()
        state, opt_step = deepspeed_state(engine, keys)
        if plain_sgd:
            for name in names:
                delta = (before[name] - after[name]) / o.lr
                crosscheck = max(crosscheck, float((delta - grads[name]).abs().max()))
        before = after
        steps.append(StepRecord(loss=float(total), grad_norm=None if norm is None else float(norm), grads=grads,
                                params=after, state=state, opt_step=opt_step))
    optimizer = deepspeed_optimizer(engine, built_by)
    if hasattr(engine, "destroy"):
        engine.destroy()
    return Driven(steps=steps, framework_version=deepspeed.__version__,
                  code_path=CODE_PATH if k.optimizer_source == "config" else TORCH_CODE_PATH, readout=READOUT,
                  extra={"ds_config": config, "readout_crosscheck_max_abs": crosscheck if plain_sgd else None},
                  optimizer=optimizer,
                  sources={"loss": "adapter", "grad_norm": "framework",
                           "state": "framework" if any(st.state for st in steps) else "none"},
                  param_dtype="float32" if masters else "")
