"""sft / engine (verl >= 0.7): `verl.trainer.sft_trainer.SFTTrainer`, built by its own constructor from the release's
own `sft_trainer_engine` hydra config (the spec's values set in it: `trainer_config`), and stepped the way its `fit`
steps it.

The constructor builds everything itself: HFModelConfig (tokenizer from the model directory stepdiff writes,
`sft_data`), verl's `MultiTurnSFTDataset` over the spec's samples (a user/assistant conversation per sample, in a
parquet file; the engine trainer has no single-turn dataset), its `DistributedSampler` + `StatefulDataLoader` with
`SFTTensorCollator` (no-padding nested tensors), the `TrainingWorker` with an FSDP engine (`FSDPEngineWithLMHead`:
verl's FSDP wrapping, `build_optimizer`, constant lr scheduler) and `sft_loss`. Steps: `train_sampler.set_epoch(0)`,
then for each batch of its `train_dataloader` exactly fit()'s loop body: `tu.get_tensordict(batch, meta_info)`,
`_get_batch_seqlens`, `assign_non_tensor(update_lr_scheduler, global_token_num)`,
`training_client.train_batch(batch)` (fit's validation, tracking and checkpoint saving are not run). The rows each
rank gets are checked against the spec's placement.

fp32: engine.model_dtype and engine.mixed_precision fp32. Read-out: gradients copied in a wrapper of the engine
instance's `optimizer_step` (after accumulation, before clipping), parameters after the step; loss and grad norm
from the worker's metrics ('loss', 'grad_norm')."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import WorkerContext
from . import cpu, sft_data, trainer_config
from .common import clip, fsdp_strategy, model_dir
from .engine import step_readout
from .knobs import VerlKnobs

CODE_PATH = ("verl.trainer.sft_trainer.SFTTrainer(config) + train_dataloader + TrainingWorker.train_batch + "
             "verl.workers.utils.losses.sft_loss (FSDPEngineWithLMHead)")


def config(spec: Spec, k: VerlKnobs, model_path: Path, parquet: Path, run_dir: Path, notes: list[str]) -> Any:
    b, o = spec.batch, spec.optimizer
    cfg = trainer_config.compose("sft_trainer_engine")
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    required: dict[str, Any] = {
        "data.train_batch_size": spec.samples_per_step, "data.micro_batch_size_per_gpu": b.micro_batch_size,
        "data.use_dynamic_bsz": False, "data.train_files": str(parquet), "data.val_files": None,
        "data.max_length": sft_data.max_length(spec), "data.truncation": "error",
        "model.path": str(model_path), "model.use_remove_padding": k.use_remove_padding,
        "model.enable_gradient_checkpointing": False, "model.lora_rank": 0,
        "model.override_config": {"attn_implementation": spec.model.attn_implementation},
        "engine.strategy": fsdp_strategy(k.strategy), "engine.model_dtype": "fp32", "engine.mixed_precision": fp32,
        "engine.use_torch_compile": False, "engine.use_orig_params": k.strategy == "fsdp1",
        "optim.optimizer": "SGD" if o.name == "sgd" else "AdamW", "optim.optimizer_impl": "torch.optim",
        "optim.lr": o.lr, "optim.weight_decay": o.weight_decay, "optim.clip_grad": clip(spec),
        "optim.lr_scheduler_type": "constant", "optim.lr_warmup_steps": 0, "optim.lr_warmup_steps_ratio": 0.0,
        "optim.override_optimizer_config": {"momentum": o.momentum} if o.name == "sgd" else {"eps": o.eps},
        "trainer.total_epochs": 1, "trainer.total_training_steps": b.steps,
    }
    if o.name == "adamw":
        required["optim.betas"] = list(o.betas)
    optional = {"trainer.device": "cpu" if spec.run.device == "cpu" else "cuda", "trainer.resume_mode": "disable",
                "trainer.logger": ["console"], "trainer.default_local_dir": str(run_dir / "checkpoints"),
                "data.num_workers": 0}
    return trainer_config.apply(cfg, required, optional, notes)


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str],
          notes: list[str]) -> tuple[list[StepRecord], dict[str, Any]]:
    import torch

    if ctx.device == "cpu":
        patches += [p.target for p in cpu.register_cpu_engines()]
    patches += [p.target for p in cpu.disable_hardcoded_autocast(["verl.workers.engine.fsdp.transformer_impl"])]
    patches.append(cpu.ATTN_CONFIG.target)
    from tensordict.tensorclass import NonTensorData
    from verl.trainer import sft_trainer
    from verl.utils import tensordict_utils as tu

    run_dir = ctx.scratch / f"engine-sft-{uuid.uuid4().hex[:8]}"
    model_path, _ = model_dir(spec, init_path, ctx)
    sft_data.write_tokenizer(spec, model_path)
    parquet = sft_data.write_parquet(spec, run_dir / "train.parquet", "multi-turn")
    cfg = config(spec, k, model_path, parquet, run_dir, notes)
    tr = sft_trainer.SFTTrainer(config=cfg)
    engine = tr.engine
    # fit()'s meta_info, key for key
    meta_info = {
        "use_remove_padding": cfg.model.use_remove_padding, "use_dynamic_bsz": cfg.data.use_dynamic_bsz,
        "max_token_len_per_gpu": cfg.data.max_token_len_per_gpu,
        "micro_batch_size_per_gpu": cfg.data.micro_batch_size_per_gpu, "temperature": 1.0,
        "global_batch_size": tr.global_batch_size, "pad_mode": cfg.data.pad_mode,
        "pad_token_id": tr.model_config.tokenizer.pad_token_id,
    }
    steps: list[StepRecord] = []
    with step_readout(engine) as record:
        for data in sft_data.fit_batches(spec, tr, ctx.rank, lambda d: [t.tolist() for t in d["input_ids"].unbind()]):
            data = tu.get_tensordict(tensor_dict=data, non_tensor_dict=meta_info)
            seqlens = tr._get_batch_seqlens(data=data)
            tu.assign_non_tensor(data, update_lr_scheduler=True, global_token_num=NonTensorData(seqlens))
            steps.append(record(tr.training_client.train_batch(data=data)))
    torch.distributed.barrier()
    notes.append(f"engine SFT trainer: {type(tr.train_dataset).__name__} read the spec's samples (one user/assistant "
                 "conversation each); fit()'s loop body, without its validation, tracking and checkpoints")
    return steps, {"verl_config": trainer_config.to_container(cfg), "dataset": type(tr.train_dataset).__name__,
                   "optimizer": type(engine.optimizer).__name__}
