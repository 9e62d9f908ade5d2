"""critic / engine (verl >= 0.7): `TrainingWorker(model_type="value_model").train_mini_batch(td)` with
`verl.workers.utils.losses.value_loss` (`FSDPCriticConfig`), a `LlamaForTokenClassification(num_labels=1)` value head
whose `score.weight` is the canonical name; data as `ray_trainer._update_critic` builds it (`engine.ppo_tensordict`).
The 0.7.x engine critic without use_remove_padding crashes in verl (values not squeezed)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import WorkerContext
from . import cpu, engine
from .common import clip, config_kwargs, fsdp_strategy
from .knobs import VerlKnobs

CODE_PATH = ("verl.workers.engine_workers.TrainingWorker(value_model).train_mini_batch + "
             "verl.workers.utils.losses.value_loss (FSDPEngineWithValueHead)")


def loss(spec: Spec, k: VerlKnobs, optim_cfg: Any, model_cfg: Any, notes: list[str]) -> tuple[Any, Any]:
    from verl.workers.config import FSDPCriticConfig
    from verl.workers.utils import losses

    cfg = FSDPCriticConfig(**config_kwargs(FSDPCriticConfig, dict(
        strategy=fsdp_strategy(k.strategy), rollout_n=1, ppo_mini_batch_size=spec.samples_per_step,
        ppo_micro_batch_size_per_gpu=spec.batch.micro_batch_size, use_dynamic_bsz=False,
        loss_agg_mode=spec.loss.aggregation, cliprange_value=spec.rl.value_clip, ppo_epochs=1,
        shuffle=False, grad_clip=clip(spec), optim=optim_cfg, model_config=model_cfg), notes))
    return cfg, partial(losses.value_loss, config=cfg)


PATH = engine.EnginePath(model_type="value_model", loss=loss, batch=engine.ppo_tensordict, train="train_mini_batch",
                         rl=True, model_override={"architectures": ["LlamaForTokenClassification"], "num_labels": 1,
                                                  "classifier_dropout": 0.0})


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str],
          notes: list[str]) -> tuple[list[StepRecord], dict[str, Any]]:
    patches += [p.target for p in cpu.patch_valuehead_loader(spec.model.attn_implementation)]
    return engine.drive(spec, init_path, ctx, k, patches, notes, PATH)
