"""sft / legacy (verl <= 0.7.0): `verl.trainer.fsdp_sft_trainer.FSDPSFTTrainer`, built by its own constructor the way
its `run_sft` builds it, and stepped the way its `fit` steps it.

- Config: the release's own `sft_trainer` hydra config with the spec's values set (`trainer_config`).
- Data: the spec's samples in a parquet file stepdiff writes, read by verl's own dataset (`create_sft_dataset`:
  `SFTDataset` for single-turn, `MultiTurnSFTDataset` with `data.multiturn.enable` for multi-turn), tokenised by a
  local tokenizer whose ids are the spec's ids (`sft_data`). verl builds every input tensor and the loss mask.
- Model, FSDP wrapping (FSDP2 `apply_fsdp2` or FSDP1), optimizer (`AdamW`; `build_optimizer` from 0.6) and lr
  scheduler: the trainer's own `_build_model_optimizer`, from the model directory stepdiff writes.
- Steps: `train_sampler.set_epoch(0)`, then for each batch of the trainer's own `train_dataloader`:
  `training_step(TensorDict(batch))`, exactly fit()'s loop body (fit's validation, tracking and checkpoint saving are
  not run). The rows each rank gets are checked against the spec's placement.

The lr schedule is verl's cosine with 0 warmup over `total_epochs` x steps per epoch; total_epochs is set so large
that every step's lr equals the spec's constant lr to double precision (there is no constant schedule before 0.7).
Read-out: gradients copied in a wrapper of the clip call training_step makes (`fsdp2_clip_grad_norm_` / the FSDP1
module's `clip_grad_norm_`: after accumulation, before clipping); loss 'train/loss' (rank 0's on CPU: the trainer
all-reduces it only on CUDA); grad norm: what the clip returns."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import WorkerContext
from ..common import torch_dtype
from ..readouts import fsdp_full, wrapped
from . import cpu, sft_data, trainer_config
from .common import clip, fsdp_strategy, model_dir, scalar
from .knobs import VerlKnobs

CODE_PATH = ("verl.trainer.fsdp_sft_trainer.FSDPSFTTrainer(config, device_mesh, ulysses_device_mesh, tokenizer, "
             "train_dataset, val_dataset) + train_dataloader + training_step")
HUGE_EPOCHS = 10**12
"""cos(pi * step / (epochs x steps_per_epoch)) == 1.0 in double precision for any step a spec takes."""


def dataset_of(k: VerlKnobs) -> sft_data.Dataset:
    """The trainer's default dataset is SFTDataset (data.multiturn.enable = false)."""
    return "multi-turn" if k.dataset == "multi-turn" else "single-turn"


def config(spec: Spec, k: VerlKnobs, model_path: Path, parquet: Path, run_dir: Path, notes: list[str]) -> Any:
    b, o = spec.batch, spec.optimizer
    cfg = trainer_config.compose("sft_trainer")
    new_optim = trainer_config.has(cfg, "optim.optimizer")  # 0.6+: build_optimizer(config.optim)
    required: dict[str, Any] = {
        "data.train_batch_size": spec.samples_per_step, "data.micro_batch_size_per_gpu": b.micro_batch_size,
        "data.train_files": str(parquet), "data.val_files": str(parquet), "data.prompt_key": "prompt",
        "data.response_key": "response", "data.prompt_dict_keys": None, "data.response_dict_keys": None,
        "data.max_length": sft_data.max_length(spec), "data.truncation": "error", "data.balance_dp_token": False,
        "data.multiturn.enable": dataset_of(k) == "multi-turn", "data.multiturn.tools_key": None,
        "model.partial_pretrain": str(model_path), "model.strategy": fsdp_strategy(k.strategy),
        "model.fsdp_config.model_dtype": "fp32", "model.enable_gradient_checkpointing": False,
        "model.lora_rank": 0, "use_remove_padding": k.use_remove_padding, "ulysses_sequence_parallel_size": 1,
        "optim.lr": o.lr, "optim.weight_decay": o.weight_decay, "optim.clip_grad": clip(spec),
        "optim.lr_scheduler": "cosine", "trainer.total_epochs": HUGE_EPOCHS // b.steps,
        ("optim.lr_warmup_steps_ratio" if new_optim else "optim.warmup_steps_ratio"): 0.0,
    }
    if o.name == "adamw":
        required["optim.betas"] = list(o.betas)
    if new_optim:
        required.update({"optim.optimizer": "SGD" if o.name == "sgd" else "AdamW",
                         "optim.optimizer_impl": "torch.optim",
                         "optim.override_optimizer_config": ({"momentum": o.momentum} if o.name == "sgd"
                                                             else {"eps": o.eps})})
    optional = {"trainer.device": "cpu" if spec.run.device == "cpu" else "cuda", "trainer.resume_mode": "disable",
                "trainer.logger": ["console"], "trainer.default_local_dir": str(run_dir / "checkpoints")}
    return trainer_config.apply(cfg, required, optional, notes)


def import_trainer(ctx: WorkerContext, patches: list[str]) -> Any:
    import importlib

    try:
        return importlib.import_module("verl.trainer.fsdp_sft_trainer")
    except ModuleNotFoundError as e:
        if e.name != "qwen_vl_utils":
            raise RuntimeError(f"verl {ctx.state['version']} has no legacy fsdp_sft_trainer (removed in 0.7.1): "
                               f"{e}") from None
    patches += [p.target for p in cpu.install_qwen_vl_utils_stub()]  # 0.7.0
    return importlib.import_module("verl.trainer.fsdp_sft_trainer")


def unpadded_rows(data: Any) -> list[list[int]]:
    """A legacy dataloader batch's rows without their padding (the datasets right-pad to data.max_length)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(data["input_ids"], data["attention_mask"], strict=True)]


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str],
          notes: list[str]) -> tuple[list[StepRecord], dict[str, Any]]:
    from tensordict import TensorDict
    from torch.distributed.device_mesh import init_device_mesh

    fst = import_trainer(ctx, patches)
    from verl.utils import hf_tokenizer

    patches += [p.target for p in cpu.disable_hardcoded_autocast(["verl.trainer.fsdp_sft_trainer"])]
    run_dir = ctx.scratch / f"legacy-sft-{uuid.uuid4().hex[:8]}"
    model_path, _ = model_dir(spec, init_path, ctx)
    sft_data.write_tokenizer(spec, model_path)
    parquet = sft_data.write_parquet(spec, run_dir / "train.parquet", dataset_of(k))
    cfg = config(spec, k, model_path, parquet, run_dir, notes)
    # run_sft: meshes, tokenizer, datasets, the trainer
    device_mesh = init_device_mesh(ctx.device, mesh_shape=(ctx.world_size,), mesh_dim_names=("fsdp",))
    ulysses_mesh = init_device_mesh(ctx.device, mesh_shape=(ctx.world_size, 1), mesh_dim_names=("dp", "sp"))
    tokenizer = hf_tokenizer(str(model_path), trust_remote_code=False)
    train_dataset = fst.create_sft_dataset(cfg.data.train_files, cfg.data, tokenizer)
    val_dataset = fst.create_sft_dataset(cfg.data.val_files, cfg.data, tokenizer)
    with cpu.legacy_sft_trainer_patches(fst, spec.model.attn_implementation, torch_dtype(spec.model.dtype)) as p:
        patches += [x.target for x in p]
        tr = fst.FSDPSFTTrainer(config=cfg, device_mesh=device_mesh, ulysses_device_mesh=ulysses_mesh,
                                tokenizer=tokenizer, train_dataset=train_dataset, val_dataset=val_dataset)
    module = tr.fsdp_model
    device = getattr(tr, "device_name", ctx.device)
    snap: dict[str, Any] = {}

    def make(original: Any) -> Any:
        def clip_with_readout(*a: Any, **kw: Any) -> Any:
            snap["grads"] = fsdp_full(module, "grad")
            snap["norm"] = norm = original(*a, **kw)
            return norm
        return clip_with_readout

    # the clip call training_step makes: verl's fsdp2 helper (a module attribute) or the FSDP1 module's method
    clip_owner, clip_attr = (fst, "fsdp2_clip_grad_norm_") if k.strategy == "fsdp2" else (module, "clip_grad_norm_")
    steps: list[StepRecord] = []
    with wrapped(clip_owner, clip_attr, make):
        for data in sft_data.fit_batches(spec, tr, ctx.rank, unpadded_rows):
            batch = TensorDict(data, batch_size=cfg.data.train_batch_size).to(device)
            metrics = tr.training_step(batch)
            params = fsdp_full(module, "param")
            if "grads" not in snap:
                raise RuntimeError("FSDPSFTTrainer.training_step did not clip/step")
            steps.append(StepRecord(loss=scalar(metrics.get("train/loss")), grad_norm=scalar(snap.pop("norm")),
                                    grads=snap.pop("grads"), params=params))
    notes.append(f"legacy SFT trainer: {type(train_dataset).__name__} read the spec's samples "
                 f"({dataset_of(k)}); fit()'s loop body, without its validation, tracking and checkpoints")
    if ctx.world_size > 1 and spec.run.device == "cpu":
        notes.append("legacy SFT reports rank 0's loss on CPU (it all-reduces only when CUDA is available)")
    return steps, {"verl_config": trainer_config.to_container(cfg), "dataset": type(train_dataset).__name__,
                   "optimizer": type(tr.optimizer).__name__}
