"""actor / legacy (verl <= 0.7): `verl.workers.actor.dp_actor.DataParallelPPOActor.update_policy(DataProto)` with the
module wrapped by verl's `apply_fsdp2` (fsdp2) or FSDP1 (`fsdp.wrap_fsdp`), `ppo_mini_batch_size` per GPU as
fsdp_workers passes it (after its own division of the global one by dp), fsdp_config.dtype fp32. The legacy actor
ignores the old log-probs and uses log_prob.detach() on-policy. Read-out: gradients copied in a wrapper of the actor
instance's `_optimizer_step` (after accumulation, before clipping); loss: 'actor/pg_loss' (a per-rank mean, averaged
over ranks); grad norm: what `_optimizer_step` returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import WorkerContext
from ..common import build_model
from ..readouts import fsdp_full, wrapped
from .common import (
    actor_config_kwargs,
    asdict,
    config_kwargs,
    fsdp_strategy,
    load_shadow,
    model_dir,
    ppo_tensors,
    scalar,
)
from .fsdp import torch_optimizer, wrap_fsdp
from .knobs import VerlKnobs

CODE_PATH = "verl.workers.actor.dp_actor.DataParallelPPOActor.update_policy"


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str],
          notes: list[str]) -> tuple[list[StepRecord], dict[str, Any]]:
    import torch

    try:
        from verl.workers.actor.dp_actor import DataParallelPPOActor
    except ImportError as e:
        raise RuntimeError(f"verl {ctx.state['version']} has no legacy dp_actor (removed in 0.8): {e}") from None
    from verl import DataProto
    from verl.workers.config import FSDPActorConfig, FSDPEngineConfig

    b = spec.batch
    _, shadow = model_dir(spec, init_path, ctx)
    model = build_model(spec, init_path).to(ctx.torch_device)
    model.train()
    module = wrap_fsdp(model, ctx, k.strategy)
    optimizer = torch_optimizer(spec, module)
    per_gpu = b.micro_batch_size * b.grad_accum  # fsdp_workers: ppo_mini_batch_size * rollout_n // dp
    fsdp_cfg = FSDPEngineConfig(**config_kwargs(FSDPEngineConfig, dict(
        dtype="fp32", strategy=fsdp_strategy(k.strategy), model_dtype="fp32"), notes))
    cfg = FSDPActorConfig(**config_kwargs(FSDPActorConfig, {
        **actor_config_kwargs(spec, k.strategy, per_gpu, k.use_remove_padding), "fsdp_config": fsdp_cfg}, notes))
    actor = DataParallelPPOActor(config=cfg, actor_module=module, actor_optimizer=optimizer)
    snap: dict[str, Any] = {}

    def make(original: Any) -> Any:
        def optimizer_step_with_readout() -> Any:
            snap["grads"] = fsdp_full(module, "grad")
            snap["norm"] = norm = original()
            return norm
        return optimizer_step_with_readout

    steps = []
    with wrapped(actor, "_optimizer_step", make):
        for s in range(b.steps):
            data = DataProto.from_dict(tensors=ppo_tensors(spec, s, ctx, shadow),
                                       meta_info={"temperature": 1.0, "pad_token_id": spec.data.pad_id})
            metrics = actor.update_policy(data)
            params = fsdp_full(module, "param")
            if "grads" not in snap:
                raise RuntimeError("DataParallelPPOActor.update_policy did not step the optimizer")
            t = torch.tensor([scalar(metrics.get("actor/pg_loss"))], dtype=torch.float64)
            torch.distributed.all_reduce(t)  # pg_loss is per rank (a per-rank mean): summed over ranks / ws
            steps.append(StepRecord(loss=float(t) / ctx.world_size, grad_norm=scalar(snap.pop("norm")),
                                    grads=snap.pop("grads"), params=params))
            load_shadow(shadow, params)
    notes.append("legacy actor: ppo_mini_batch_size is per GPU (fsdp_workers divides the global one by dp)")
    return steps, {"verl_config": {"actor": asdict(cfg), "per_gpu_mini_batch": per_gpu}}
