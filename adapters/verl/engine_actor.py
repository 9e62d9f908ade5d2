"""actor / engine (verl >= 0.7): `TrainingWorker.train_mini_batch(td)` with `verl.workers.utils.losses.ppo_loss`
(`FSDPActorConfig`), data as `ray_trainer._update_actor` builds it (`engine.ppo_tensordict`)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import WorkerContext
from . import engine
from .common import actor_config_kwargs, config_kwargs
from .knobs import VerlKnobs

CODE_PATH = ("verl.workers.engine_workers.TrainingWorker.train_mini_batch + verl.workers.utils.losses.ppo_loss "
             "(FSDPEngineWithLMHead)")


def loss(spec: Spec, k: VerlKnobs, optim_cfg: Any, model_cfg: Any, notes: list[str]) -> tuple[Any, Any]:
    from verl.workers.config import FSDPActorConfig
    from verl.workers.utils import losses

    kwargs = actor_config_kwargs(spec, k.strategy, spec.samples_per_step, k.use_remove_padding)
    cfg = FSDPActorConfig(**config_kwargs(FSDPActorConfig, {**kwargs, "optim": optim_cfg}, notes))
    return cfg, partial(losses.ppo_loss, config=cfg)


PATH = engine.EnginePath(model_type="language_model", loss=loss, batch=engine.ppo_tensordict,
                         train="train_mini_batch", rl=True)


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str],
          notes: list[str]) -> tuple[list[StepRecord], dict[str, Any]]:
    return engine.drive(spec, init_path, ctx, k, patches, notes, PATH)
