"""actor / legacy (verl <= 0.7): verl's own `verl.workers.fsdp_workers.ActorRolloutRefWorker(config, role="actor")`,
built in-process (no Ray) from the `actor_rollout_ref` section of the release's `ppo_trainer` hydra config with the
spec's values set (`trainer_config`); `init_model()` builds the model from the directory stepdiff writes, verl's FSDP
wrapping, its optimizer (`build_optimizer`) and lr scheduler, and the `DataParallelPPOActor`. Each step is
`update_actor(DataProto)` with the batch `ray_trainer` hands it (left/right-padded PPO tensors, `global_token_num`,
temperature); the worker normalises `ppo_mini_batch_size` by rollout.n and dp itself and calls
`DataParallelPPOActor.update_policy`. The legacy actor ignores the old log-probs and uses log_prob.detach()
on-policy. Read-out: gradients copied in a wrapper of the actor instance's `_optimizer_step` (after accumulation,
before clipping); loss: 'actor/pg_loss' (a per-rank mean, averaged over ranks); grad norm: what `_optimizer_step`
returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import WorkerContext
from ..readouts import fsdp_full, wrapped
from . import sft_data, trainer_config
from .common import clip, fsdp_strategy, load_shadow, model_dir, optim_kwargs, ppo_tensors, scalar
from .knobs import VerlKnobs

CODE_PATH = ("verl.workers.fsdp_workers.ActorRolloutRefWorker(role='actor').init_model + update_actor -> "
             "verl.workers.actor.dp_actor.DataParallelPPOActor.update_policy")


def config(spec: Spec, k: VerlKnobs, model_path: Path, notes: list[str]) -> Any:
    b, rl = spec.batch, spec.rl
    cfg = trainer_config.compose("ppo_trainer").actor_rollout_ref
    o = optim_kwargs(spec)
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    required: dict[str, Any] = {
        "model.path": str(model_path), "model.use_remove_padding": k.use_remove_padding,
        "model.enable_gradient_checkpointing": False, "model.lora_rank": 0,
        "model.override_config": {"attn_implementation": spec.model.attn_implementation},
        "rollout.n": 1,
        "actor.strategy": fsdp_strategy(k.strategy), "actor.ppo_mini_batch_size": spec.samples_per_step,
        "actor.ppo_micro_batch_size_per_gpu": b.micro_batch_size, "actor.use_dynamic_bsz": False,
        "actor.loss_agg_mode": spec.loss.aggregation, "actor.clip_ratio": rl.clip_ratio_low,
        "actor.clip_ratio_low": rl.clip_ratio_low, "actor.clip_ratio_high": rl.clip_ratio_high,
        "actor.entropy_coeff": 0.0, "actor.use_kl_loss": False, "actor.ppo_epochs": 1, "actor.shuffle": False,
        "actor.use_torch_compile": False, "actor.grad_clip": clip(spec),
        "actor.optim.optimizer": o["optimizer"], "actor.optim.optimizer_impl": o["optimizer_impl"],
        "actor.optim.lr": o["lr"], "actor.optim.weight_decay": o["weight_decay"], "actor.optim.clip_grad": clip(spec),
        "actor.optim.override_optimizer_config": o["override_optimizer_config"],
        "actor.optim.lr_scheduler_type": "constant", "actor.optim.lr_warmup_steps": 0,
        "actor.optim.lr_warmup_steps_ratio": 0.0, "actor.optim.total_training_steps": b.steps,
        # fsdp_config.dtype is dp_actor's autocast dtype (bf16 by default, which CPU autocast really computes in);
        # fp32 turns that autocast off
        "actor.fsdp_config.model_dtype": "fp32", "actor.fsdp_config.mixed_precision": fp32,
        "actor.fsdp_config.dtype": "fp32", "actor.fsdp_config.strategy": fsdp_strategy(k.strategy),
        "actor.fsdp_config.param_offload": False, "actor.fsdp_config.optimizer_offload": False,
        "actor.fsdp_config.use_orig_params": k.strategy == "fsdp1",  # FSDP1 read-out (same math)
    }
    if "betas" in o:
        required["actor.optim.betas"] = list(o["betas"])
    return trainer_config.apply(cfg, required, {}, notes)


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str],
          notes: list[str]) -> tuple[list[StepRecord], dict[str, Any]]:
    import torch

    try:
        from verl.workers.actor.dp_actor import DataParallelPPOActor  # noqa: F401 - only to say why it is absent
    except ImportError as e:
        raise RuntimeError(f"verl {ctx.state['version']} has no legacy dp_actor (removed in 0.8): {e}") from None
    from verl import DataProto
    from verl.workers import fsdp_workers

    b = spec.batch
    model_path, shadow = model_dir(spec, init_path, ctx)
    sft_data.write_tokenizer(spec, model_path)  # the worker loads hf_tokenizer(model.path) for its pad id
    cfg = config(spec, k, model_path, notes)
    worker = fsdp_workers.ActorRolloutRefWorker(config=cfg, role="actor")
    worker.init_model()
    module, actor = worker.actor_module_fsdp, worker.actor
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
            tensors = ppo_tensors(spec, s, ctx, shadow)
            # ray_trainer: global_token_num from the attention mask, temperature from the rollout config
            meta = {"temperature": 1.0, "global_token_num": tensors["attention_mask"].sum(-1).tolist()}
            out = worker.update_actor(DataProto.from_dict(tensors=tensors, meta_info=meta))
            metrics = out.meta_info["metrics"]
            params = fsdp_full(module, "param")
            if "grads" not in snap:
                raise RuntimeError("ActorRolloutRefWorker.update_actor did not step the optimizer")
            t = torch.tensor([scalar(metrics.get("actor/pg_loss"))], dtype=torch.float64)
            torch.distributed.all_reduce(t)  # pg_loss is per rank (a per-rank mean): summed over ranks / ws
            steps.append(StepRecord(loss=float(t) / ctx.world_size, grad_norm=scalar(snap.pop("norm")),
                                    grads=snap.pop("grads"), params=params))
            load_shadow(shadow, params)
    notes.append("legacy actor: fsdp_workers.ActorRolloutRefWorker(role='actor') built in-process; ppo_mini_batch_size "
                 "global (the worker divides it by dp)")
    return steps, {"verl_config": {"actor_rollout_ref": trainer_config.to_container(cfg)},
                   "optimizer": type(worker.actor_optimizer).__name__}
