"""SFT through trl.SFTTrainer (see adapters/trl.py for the read-outs).

Data: pre-tokenised rows laid out in the spec's placement. TRL >= 0.19 (SFTConfig has `completion_only_loss`):
columns `input_ids` + `completion_mask` (1 on supervised tokens) with `completion_only_loss=True` and TRL's own
collator. Older TRL has no completion mask for token data: a `labels` column (-100 off the completion mask) with
`dataset_kwargs={"skip_prepare_dataset": True}` and transformers' DataCollatorForSeq2Seq (right padding, -100 label
padding), so the model's own loss (transformers' Trainer path of that era) runs.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from . import trl_common as C
from .base import WorkerContext, build_model, make_optimizer


def dataset_order(spec: Spec) -> list[int]:
    """Sample indices in the order the (sequential) Trainer dataloader must see them: per step, per micro-batch, the
    ranks' micro-batches in rank order (accelerate deals batches round-robin to ranks)."""
    b = spec.batch
    return [i for s in range(b.steps) for m in range(b.grad_accum) for r in range(b.world_size)
            for i in D.micro_batch_indices(spec, s, r, m)]


def completion_mask(spec: Spec, sample: Any) -> list[int]:
    """1 where the token is a supervised target (position 0 follows data.supervise: a user masking 'all' masks it)."""
    targets = D.supervised_targets(spec, sample)
    first = 1 if spec.data.supervise == "all" else 0
    return [first, *[int(t) for t in targets]]


def run(spec: Spec, init_path: Path, ctx: WorkerContext, knobs: Any) -> dict[str, Any]:
    import datasets
    import transformers
    import trl
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    smp = D.samples(spec)
    tok = C.build_tokenizer(spec)
    notes: list[str] = []
    patches: list[str] = []
    new_path = "completion_only_loss" in C.config_fields(SFTConfig)
    rows = []
    for i in dataset_order(spec):
        s = smp[i]
        ids = [*s.prompt, *s.response]
        mask = completion_mask(spec, s)
        if new_path:
            rows.append({"input_ids": ids, "completion_mask": mask})
        else:
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [t if mk else -100 for t, mk in zip(ids, mask, strict=True)]})
    ds = datasets.Dataset.from_list(rows)

    stage = knobs.deepspeed_zero_stage
    dsc = C.ds_config(spec, stage, knobs.offload_optimizer) if stage else None
    args = C.common_args(spec, ctx, str(ctx.scratch / "sft"), Trainer, dsc)
    args["gradient_checkpointing"] = knobs.gradient_checkpointing
    sft: dict[str, Any] = dict(
        packing=False, padding_free=False, max_length=None, max_seq_length=None, completion_only_loss=True,
        assistant_only_loss=False, dataset_num_proc=None, use_liger_kernel=False, neftune_noise_alpha=None,
        activation_offloading=False, shuffle_dataset=False, pad_to_multiple_of=None)
    if not new_path:
        sft["dataset_kwargs"] = {"skip_prepare_dataset": True}
        sft["remove_unused_columns"] = False
        sft.pop("max_seq_length")
        sft["max_seq_length"] = 10**6  # no truncation (skip_prepare_dataset: never applied to token data anyway)
    wanted = {**args, **sft}
    kwargs = C.normalise(SFTConfig, wanted, notes)
    cfg = SFTConfig(**kwargs)

    model = build_model(spec, init_path).to(ctx.torch_device)
    model.train()
    cap = C.Capture()
    init_sig = inspect.signature(SFTTrainer.__init__).parameters
    tkw: dict[str, Any] = dict(model=model, args=cfg, train_dataset=ds,
                               callbacks=[C.step_callback(cap, ctx), C.make_callback(cap)])
    tkw["processing_class" if "processing_class" in init_sig else "tokenizer"] = tok
    if not new_path:
        tkw["data_collator"] = transformers.DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    if spec.optimizer.name == "sgd" and spec.optimizer.momentum:
        # transformers 4.x's "sgd" ignores optim_args (momentum): hand the Trainer torch's SGD with momentum
        tkw["optimizers"] = (make_optimizer(spec, model.parameters()), None)
        notes.append("optimizer: torch.optim.SGD(momentum) passed to the Trainer (optimizers=)")
    trainer = SFTTrainer(**tkw)
    if "train_sampling_strategy" not in C.config_fields(SFTConfig):
        from torch.utils.data import SequentialSampler

        def sequential(*a: Any, **k: Any) -> Any:
            return SequentialSampler(trainer.train_dataset)

        trainer._get_train_sampler = sequential
        patches.append("Trainer._get_train_sampler (instance) -> SequentialSampler")
    C.hook_trainer(trainer, cap, grads_from_clip=not stage)
    if stage:
        C._DS_ACTIVE.append(cap)
    try:
        trainer.train()
    finally:
        if stage:
            C._DS_ACTIVE.remove(cap)
    return C.finish(spec, ctx, cap, trainer, notes, patches, extra={
        "trainer": "SFTTrainer", "data_path": "input_ids+completion_mask, completion_only_loss=True" if new_path
        else "labels column + DataCollatorForSeq2Seq, skip_prepare_dataset",
        "config": {k: v for k, v in kwargs.items() if k not in ("output_dir", "deepspeed")},
        "ds_config": dsc,
    }, code_path=f"trl.SFTTrainer.train (trl {trl.__version__}, transformers {transformers.__version__}"
                 f"{f', deepspeed ZeRO-{stage}' if stage else ''})",
        placement=C.check_sft_placement)
