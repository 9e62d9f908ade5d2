"""sft / legacy (verl <= 0.6): `verl.trainer.fsdp_sft_trainer.FSDPSFTTrainer.training_step(batch)` on a trainer made
with `object.__new__` (its __init__ builds a tokenizer, datasets and a hub model) and the attributes training_step
reads: config (micro_batch_size_per_gpu, balance_dp_token=False, strategy, clip_grad), the model wrapped by verl's own
`apply_fsdp2` / FSDP1 (`fsdp.wrap_fsdp`), verl's `build_optimizer`-equivalent torch optimizer, a constant LambdaLR.
The loss_mask is given in the convention the release's loss code slices (<= 0.5: `[:, :-1]`, prediction positions;
>= 0.6: `[:, 1:]`, token membership), read from its source. Read-out: gradients copied in a wrapper of the clip call
(`fsdp2_clip_grad_norm_` / FSDP1 `clip_grad_norm_`: after accumulation, before clipping); loss 'train/loss'; grad
norm: what the clip returns."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import WorkerContext
from ..common import build_model, step_rank_indices
from ..readouts import fsdp_full, wrapped
from . import cpu
from .common import clip, fsdp_strategy, scalar
from .fsdp import torch_optimizer, wrap_fsdp
from .knobs import VerlKnobs

CODE_PATH = "verl.trainer.fsdp_sft_trainer.FSDPSFTTrainer.training_step"


def mask_convention(fst: Any) -> str:
    """Which loss_mask convention this release's fsdp_sft_trainer slices, read from its source."""
    src = inspect.getsource(fst.FSDPSFTTrainer._compute_loss_and_backward)
    if 'loss_mask")[:, :-1]' in src:
        return "prediction"  # mask[t] = 1: token t+1 is trained (<= 0.5)
    if 'loss_mask")[:, 1:]' in src:
        return "membership"  # mask[t] = 1: token t is trained (>= 0.6)
    raise RuntimeError("cannot tell this fsdp_sft_trainer's loss_mask convention from its source")


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str],
          notes: list[str]) -> tuple[list[StepRecord], dict[str, Any]]:
    import torch

    try:
        from verl.trainer import fsdp_sft_trainer as fst
    except ImportError as e:
        raise RuntimeError(f"verl {ctx.state['version']} has no legacy fsdp_sft_trainer (removed in 0.7.1): "
                           f"{e}") from None
    from omegaconf import OmegaConf
    from tensordict import TensorDict

    patches += [p.target for p in cpu.disable_hardcoded_autocast(["verl.trainer.fsdp_sft_trainer"])]
    b = spec.batch
    convention = mask_convention(fst)
    model = build_model(spec, init_path).to(ctx.torch_device)
    model.train()
    module = wrap_fsdp(model, ctx, k.strategy)
    optimizer = torch_optimizer(spec, module)
    tr = object.__new__(fst.FSDPSFTTrainer)
    tr.config = OmegaConf.create({
        "ulysses_sequence_parallel_size": 1,
        "data": {"micro_batch_size_per_gpu": b.micro_batch_size, "balance_dp_token": False,
                 "train_batch_size": spec.samples_per_step},
        "model": {"strategy": fsdp_strategy(k.strategy)},
        "optim": {"clip_grad": clip(spec)},
    })
    tr.use_remove_padding = k.use_remove_padding  # only acts with ulysses sp > 1 in this trainer
    tr.device_name = "cuda" if ctx.device == "cuda" else "cpu"
    tr.model = model
    tr.fsdp_model = module
    tr.optimizer = optimizer
    tr.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    tr.device_mesh = None
    tr.ulysses_device_mesh = None
    tr.sharding_manager = None
    snap: dict[str, Any] = {}

    def make(original: Any) -> Any:
        def clip_with_readout(*a: Any, **kw: Any) -> Any:
            snap["grads"] = fsdp_full(module, "grad")
            snap["norm"] = norm = original(*a, **kw)
            return norm
        return clip_with_readout

    # the clip call training_step makes: verl's fsdp2 helper (a module attribute) or the FSDP1 module's method
    clip_owner, clip_attr = (fst, "fsdp2_clip_grad_norm_") if k.strategy == "fsdp2" else (module, "clip_grad_norm_")
    smp = D.samples(spec)
    steps = []
    with wrapped(clip_owner, clip_attr, make):
        for s in range(b.steps):
            idx = step_rank_indices(spec, s, ctx.rank)
            mb = D.collate(spec, idx, smp)
            mask = mb.loss_mask.clone()
            if convention == "prediction":
                mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
            pos = torch.clamp(torch.cumsum(mb.attention_mask, dim=1) - 1, min=0)
            batch = TensorDict({"input_ids": mb.input_ids, "attention_mask": mb.attention_mask,
                                "position_ids": pos, "loss_mask": mask}, batch_size=[len(idx)])
            metrics = tr.training_step(batch)
            params = fsdp_full(module, "param")
            if "grads" not in snap:
                raise RuntimeError("FSDPSFTTrainer.training_step did not clip/step")
            steps.append(StepRecord(loss=scalar(metrics.get("train/loss")), grad_norm=scalar(snap.pop("norm")),
                                    grads=snap.pop("grads"), params=params))
    notes.append(f"legacy SFT loss_mask given in the release's '{convention}' convention")
    if ctx.world_size > 1:
        notes.append("legacy SFT reports rank 0's loss on CPU (it all-reduces only when CUDA is available)")
    return steps, {"verl_config": {"trainer": OmegaConf.to_container(tr.config)}, "loss_mask_convention": convention}
