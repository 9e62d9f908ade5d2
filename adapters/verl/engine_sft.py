"""sft / engine (verl >= 0.7): `TrainingWorker.train_batch(td)` with `verl.workers.utils.losses.sft_loss`, one call
per optimizer step: exactly what `verl/trainer/sft_trainer.py` does (FSDPEngineWithLMHead.forward_backward_batch +
optimizer_step). Data in the `MultiTurnSFTDataset` no-padding layout (nested input_ids / position_ids / loss_mask,
loss_mask 1 on supervised tokens; sft_loss rolls it by -1 itself)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import WorkerContext
from ..common import step_rank_indices
from . import engine
from .knobs import VerlKnobs

CODE_PATH = ("verl.workers.engine_workers.TrainingWorker.train_batch + verl.workers.utils.losses.sft_loss "
             "(FSDPEngineWithLMHead)")


def loss(spec: Spec, k: VerlKnobs, optim_cfg: Any, model_cfg: Any, notes: list[str]) -> tuple[Any, Any]:
    from verl.workers.utils import losses

    return None, partial(losses.sft_loss, config=None)


def batch(spec: Spec, step: int, ctx: WorkerContext, shadow: Any) -> Any:
    import torch
    from tensordict import NonTensorData
    from verl.utils import tensordict_utils as tu

    smp = D.samples(spec)
    ids, pos, mask = [], [], []
    for i in step_rank_indices(spec, step, ctx.rank):
        s = smp[i]
        seq = (*s.prompt, *s.response)
        ids.append(torch.tensor(seq, dtype=torch.long))
        pos.append(torch.arange(len(seq), dtype=torch.long))
        mask.append(torch.tensor([0, *[int(x) for x in D.supervised_targets(spec, s)]], dtype=torch.long))
    tensors = {"input_ids": torch.nested.as_nested_tensor(ids, layout=torch.jagged),
               "position_ids": torch.nested.as_nested_tensor(pos, layout=torch.jagged),
               "loss_mask": torch.nested.as_nested_tensor(mask, layout=torch.jagged)}
    k: VerlKnobs = spec.knobs_for("verl")
    meta = {"use_remove_padding": k.use_remove_padding, "use_dynamic_bsz": False,
            "max_token_len_per_gpu": None, "micro_batch_size_per_gpu": spec.batch.micro_batch_size,
            "temperature": 1.0, "global_batch_size": spec.samples_per_step, "pad_token_id": spec.data.pad_id}
    td = tu.get_tensordict(tensor_dict=tensors, non_tensor_dict=meta)
    seqlens = [len(smp[i].prompt) + len(smp[i].response) for r in range(spec.batch.world_size)
               for i in step_rank_indices(spec, step, r)]
    tu.assign_non_tensor(td, update_lr_scheduler=True, global_token_num=NonTensorData(seqlens))
    return td


PATH = engine.EnginePath(model_type="language_model", loss=loss, batch=batch, train="train_batch", rl=False)


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str],
          notes: list[str]) -> tuple[list[StepRecord], dict[str, Any]]:
    return engine.drive(spec, init_path, ctx, k, patches, notes, PATH)
