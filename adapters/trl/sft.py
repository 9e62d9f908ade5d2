"""SFT through trl.SFTTrainer (read-outs: `capture`).

Data: pre-tokenised rows laid out in the spec's placement. TRL >= 0.19 (SFTConfig has `completion_only_loss`):
columns `input_ids` + `completion_mask` (1 on supervised tokens) with `completion_only_loss=True` and TRL's own
collator. Older TRL has no completion mask for token data: a `labels` column (-100 off the completion mask) with
`dataset_kwargs={"skip_prepare_dataset": True}` and transformers' DataCollatorForSeq2Seq (right padding, -100 label
padding), so the model's own loss (transformers' Trainer path of that era) runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from ..base import Driven, WorkerContext
from ..common import build_model
from . import common as C
from .capture import Capture, finish, run_trainer
from .knobs import TRLKnobs


def unsupported(spec: Spec, k: TRLKnobs) -> str | None:
    if spec.loss.aggregation != "token-mean":
        return (f"loss.aggregation = {spec.loss.aggregation!r}: SFTTrainer's loss is a token mean "
                "(num_items_in_batch), it has no per-sequence aggregation")
    return None


def completion_mask(spec: Spec, sample: Any) -> list[int]:
    """1 where the token is a supervised target (position 0 follows data.supervise: a user masking 'all' masks it)."""
    targets = D.supervised_targets(spec, sample)
    first = 1 if spec.data.supervise == "all" else 0
    return [first, *[int(t) for t in targets]]


def placement(spec: Spec, cap: Capture) -> dict[str, list[int]]:
    """Every micro-batch the Trainer fed on this rank must be the spec's, in order. Returns the supervised targets
    (positions whose label is not -100) per sample index, as the framework supervised them."""
    smp = D.samples(spec)
    rank = cap.ctx.rank
    targets: dict[str, list[int]] = {}
    for s, m, idx, inp in cap.fed(spec, "SFTTrainer"):
        ids = inp["input_ids"]
        if ids.shape[0] != len(idx):
            raise RuntimeError(f"step {s} micro-batch {m} on rank {rank}: {ids.shape[0]} rows, spec has {len(idx)}")
        for row, i in enumerate(idx):
            seq = [*smp[i].prompt, *smp[i].response]
            got = ids[row, : len(seq)].tolist()
            n_attn = int(inp["attention_mask"][row].sum()) if "attention_mask" in inp else len(seq)
            if got != seq or n_attn != len(seq):
                raise RuntimeError(f"step {s} micro-batch {m} on rank {rank} row {row}: TRL fed {got} "
                                   f"(attention {n_attn}), the spec places sample {i} = {seq}: the sampler reordered "
                                   "the data")
            if "labels" in inp:
                lab = inp["labels"][row, : len(seq)].tolist()
                targets[str(i)] = [t for t in range(1, len(seq)) if lab[t] != -100]
    return targets


def config_request(spec: Spec, ctx: WorkerContext, knobs: TRLKnobs, trainer_cls: Any, new_path: bool) -> dict[str, Any]:
    """SFTConfig's keyword arguments from the spec (`new_path`: the release has completion_only_loss)."""
    stage = knobs.deepspeed_zero_stage
    dsc = C.ds_config(spec, stage, knobs.offload_optimizer, knobs.deepspeed_optimizer) if stage else None
    args = C.common_args(spec, ctx, str(ctx.scratch / "sft"), trainer_cls, dsc, knobs.gradient_checkpointing)
    sft: dict[str, Any] = dict(
        packing=False, padding_free=False, max_length=None, max_seq_length=None, completion_only_loss=True,
        assistant_only_loss=False, dataset_num_proc=None, use_liger_kernel=False, neftune_noise_alpha=None,
        activation_offloading=False, shuffle_dataset=False, pad_to_multiple_of=None)
    if not new_path:  # no completion mask for token data: the labels column carries it
        del sft["completion_only_loss"]
        sft["dataset_kwargs"] = {"skip_prepare_dataset": True}
        sft["remove_unused_columns"] = False
        sft["max_seq_length"] = 10**6  # no truncation (skip_prepare_dataset: never applied to token data anyway)
    return {**args, **sft}


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, knobs: TRLKnobs) -> Driven:
    import datasets
    import transformers
    import trl
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    smp = D.samples(spec)
    tok = C.build_tokenizer(spec)
    notes: list[str] = []
    new_path = "completion_only_loss" in C.config_fields(SFTConfig)
    rows = []
    for i in C.dataset_order(spec):
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
    wanted = config_request(spec, ctx, knobs, Trainer, new_path)
    dsc = wanted.get("deepspeed")
    absent: dict[str, str] = {}
    cfg, kwargs = C.trainer_config(SFTConfig, wanted, absent)

    model = build_model(spec, init_path).to(ctx.torch_device)
    model.train()
    cap = Capture(ctx)
    tkw = C.trainer_kwargs(spec, model, tok, SFTTrainer, notes, args=cfg, train_dataset=ds,
                           callbacks=cap.callbacks())
    if not new_path:
        tkw["data_collator"] = transformers.DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = SFTTrainer(**tkw)
    patches = [p.target for p in C.sequential_sampler(trainer, SFTConfig)]
    run_trainer(trainer, cap, deepspeed=bool(stage))
    extra = {"trainer": "SFTTrainer", "data_path": "input_ids+completion_mask, completion_only_loss=True" if new_path
             else "labels column + DataCollatorForSeq2Seq, skip_prepare_dataset",
             "config": {k: v for k, v in kwargs.items() if k not in ("output_dir", "deepspeed")}, "ds_config": dsc,
             "absent_config_fields": absent}
    code_path = (f"trl.SFTTrainer.train (trl {trl.__version__}, transformers {transformers.__version__}"
                 f"{f', deepspeed ZeRO-{stage}' if stage else ''})")
    return finish(spec, cap, trainer, notes, patches, extra, code_path, placement(spec, cap))
