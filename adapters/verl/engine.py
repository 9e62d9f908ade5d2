"""verl's model-engine TrainingWorker (verl >= 0.7), built in-process without Ray, as the engine paths share it:
`verl.workers.engine_workers.TrainingWorker` with an FSDP engine (`FSDPEngineWithLMHead` / `FSDPEngineWithValueHead`,
forward_backward_batch + optimizer_step), a loss function from `verl.workers.utils.losses`, one
`train_batch` / `train_mini_batch` call per optimizer step. The path modules (`engine_sft`, `engine_actor`,
`engine_critic`) say which loss, which batch and which call.

fp32 everywhere: model_dtype / mixed_precision fp32. Engine mini-batch sizes are global (TrainingWorker divides by
dp). Read-out: gradients copied in a wrapper of the engine instance's `optimizer_step` (after accumulation, before
clipping), parameters after the step; loss and grad norm from the worker's metrics ('loss', 'grad_norm').
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import WorkerContext
from ..readouts import fsdp_full, fsdp_optimizer_state, wrapped
from . import cpu
from .common import asdict, clip, config_kwargs, fsdp_strategy, load_shadow, model_dir, optim_kwargs, scalar
from .knobs import VerlKnobs


@dataclass(frozen=True)
class EnginePath:
    """What differs between the engine paths."""

    model_type: str
    """TrainingWorkerConfig.model_type: 'language_model' or 'value_model'."""
    loss: Callable[[Spec, VerlKnobs, Any, Any, list[str]], tuple[Any, Any]]
    """(spec, knobs, optimizer config, model config, notes) -> (loss config or None, loss function)."""
    batch: Callable[[Spec, int, WorkerContext, Any], Any]
    """(spec, step, ctx, shadow model) -> the step's TensorDict on this rank."""
    train: str
    """The TrainingWorker method that takes one optimizer step: 'train_batch' or 'train_mini_batch'."""
    rl: bool
    """An RL path: the shadow model follows the parameters (old log-probs / values of the next step)."""
    model_override: dict[str, Any] = field(default_factory=dict)
    """HFModelConfig.override_config entries besides the attention kernel."""


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str], notes: list[str],
          path: EnginePath) -> tuple[list[StepRecord], dict[str, Any]]:
    import torch

    version = ctx.state["version"]
    if ctx.device == "cpu":
        patches += [p.target for p in cpu.register_cpu_engines()]
    patches += [p.target for p in cpu.disable_hardcoded_autocast(["verl.workers.engine.fsdp.transformer_impl"])]
    patches.append(cpu.ATTN_CONFIG.target)
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine_workers import TrainingWorker, TrainingWorkerConfig

    b = spec.batch
    rmpad = k.use_remove_padding
    directory, shadow = model_dir(spec, init_path, ctx)
    override: dict[str, Any] = {"attn_implementation": spec.model.attn_implementation, **path.model_override}
    model_cfg = HFModelConfig(**config_kwargs(HFModelConfig, dict(
        path=str(directory), load_tokenizer=False, use_remove_padding=rmpad, override_config=override,
        enable_gradient_checkpointing=False, trust_remote_code=False), notes))
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    engine_cfg = FSDPEngineConfig(**config_kwargs(FSDPEngineConfig, dict(
        strategy=fsdp_strategy(k.strategy), use_dynamic_bsz=False,
        micro_batch_size_per_gpu=b.micro_batch_size, infer_micro_batch_size_per_gpu=b.micro_batch_size,
        mixed_precision=fp32, model_dtype="fp32", use_torch_compile=False, use_remove_padding=rmpad,
        use_orig_params=(k.strategy == "fsdp1"), param_offload=False, optimizer_offload=False,
        offload_policy=False, forward_only=False), notes))
    optim_cfg = FSDPOptimizerConfig(**config_kwargs(FSDPOptimizerConfig, dict(
        **optim_kwargs(spec), clip_grad=clip(spec), total_training_steps=b.steps,
        lr_scheduler_type="constant", lr_warmup_steps=0, lr_warmup_steps_ratio=0.0), notes))
    worker_cfg = TrainingWorkerConfig(**config_kwargs(TrainingWorkerConfig, dict(
        model_type=path.model_type, model_config=model_cfg, engine_config=engine_cfg, optimizer_config=optim_cfg,
        checkpoint_config=CheckpointConfig()), notes))
    worker = TrainingWorker(config=worker_cfg)
    loss_cfg, loss_fn = path.loss(spec, k, optim_cfg, model_cfg, notes)
    worker.set_loss_fn(loss_fn=loss_fn)
    worker.reset()
    engine = worker.engine
    steps: list[StepRecord] = []
    with step_readout(engine) as record:
        for s in range(b.steps):
            steps.append(record(getattr(worker, path.train)(path.batch(spec, s, ctx, shadow))))
            if path.rl:
                load_shadow(shadow, steps[-1].params)
    torch.distributed.barrier()
    extra = {"verl_config": {
        "engine": asdict(engine_cfg), "optim": asdict(optim_cfg), "loss": asdict(loss_cfg),
        "global_batch_size": spec.samples_per_step, "micro_batch_size_per_gpu": b.micro_batch_size,
        "use_remove_padding": rmpad, "version": version}}
    return steps, extra


@contextlib.contextmanager
def step_readout(engine: Any) -> Iterator[Callable[[Any], StepRecord]]:
    """Within the block, the engine instance's `optimizer_step` first copies the full gradients (after accumulation,
    before clipping); yields `record(out)`, which turns one train call's output into the step's record: loss and grad
    norm from the worker's metrics ('loss', 'grad_norm'), parameters read after the step. Shared by every engine path
    (the TrainingWorker paths here and the engine SFT trainer). The optimizer's state (Adam's moments, its step
    counter) is read after the step from verl's own optimizer, gathered from its FSDP2 shards."""
    from verl.utils import tensordict_utils as tu

    snap: dict[str, Any] = {}

    def make(original: Any) -> Any:
        def optimizer_step_with_readout() -> Any:
            snap["grads"] = fsdp_full(engine.module, "grad")  # after accumulation, before clipping
            return original()
        return optimizer_step_with_readout

    def record(out: Any) -> StepRecord:
        metrics = tu.get(out, "metrics") if out is not None else {}
        params = fsdp_full(engine.module, "param")
        state, opt_step = fsdp_optimizer_state(getattr(engine, "optimizer", None), engine.module)
        if "grads" not in snap:
            raise RuntimeError("verl's engine did not call optimizer_step (no gradient read)")
        return StepRecord(loss=scalar(metrics.get("loss")), grad_norm=scalar(metrics.get("grad_norm")),
                          grads=snap.pop("grads"), params=params, state=state, opt_step=opt_step)

    with wrapped(engine, "optimizer_step", make):
        yield record


def ppo_tensordict(spec: Spec, step: int, ctx: WorkerContext, shadow: Any) -> Any:
    """The RL paths' batch as `ray_trainer._update_actor` / `_update_critic` build it: left/right-padded PPO tensors ->
    `left_right_2_no_padding`; global mini-batch = the step's samples, one epoch, shuffle off."""
    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    from .common import ppo_tensors

    tensors = ppo_tensors(spec, step, ctx, shadow)
    td = DataProto.from_dict(tensors=tensors, meta_info={"temperature": 1.0}).to_tensordict()
    td = left_right_2_no_padding(td)
    G = spec.samples_per_step
    tu.assign_non_tensor(td, calculate_entropy=False, global_batch_size=G, mini_batch_size=G, epochs=1, seed=1,
                         dataloader_kwargs={"shuffle": False}, compute_loss=True, update_lr_scheduler=True)
    return td
