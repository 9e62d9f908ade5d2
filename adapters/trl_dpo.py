"""DPO through trl.DPOTrainer (see adapters/trl.py for the read-outs).

DPOTrainer tokenises text `prompt` / `chosen` / `rejected` itself (there is no pre-tokenised path in TRL 1.x) and
appends EOS to a completion that does not end with it: the local WordLevel tokenizer makes the text round-trip to
exactly the spec's ids, and the adapter refuses (unsupported) samples whose completions do not end with EOS. The
frozen reference policy is an explicit `ref_model` built from the same initial weights (without it TRL tries to load
`config._name_or_path` from the Hub). loss_type sigmoid, beta = rl.dpo_beta, no label smoothing, no precomputed
reference log-probs, max_length None (no truncation), dropout disabled.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from . import trl_common as C
from .base import WorkerContext, build_model, make_optimizer
from .trl_sft import dataset_order


def check_placement(spec: Spec, ctx: WorkerContext, cap: C.Capture) -> dict[str, list[int]]:
    smp = D.samples(spec)
    b = spec.batch
    expected = [(s, m) for s in range(b.steps) for m in range(b.grad_accum)]
    if len(cap.micro_inputs) != len(expected):
        raise RuntimeError(f"DPOTrainer ran {len(cap.micro_inputs)} micro-batches on rank {ctx.rank}; the spec has "
                           f"{len(expected)}")
    targets: dict[str, list[int]] = {}
    for (s, m), inp in zip(expected, cap.micro_inputs, strict=True):
        idx = D.micro_batch_indices(spec, s, ctx.rank, m)
        ids, cm = inp["input_ids"], inp.get("completion_mask")
        if ids.shape[0] != 2 * len(idx):
            raise RuntimeError(f"step {s} micro-batch {m}: DPOTrainer fed {ids.shape[0]} rows for {len(idx)} pairs")
        for row, i in enumerate(idx):
            for half, resp in ((0, smp[i].response), (1, smp[i].rejected)):
                seq = [*smp[i].prompt, *resp]
                got = ids[half * len(idx) + row, : len(seq)].tolist()
                if got != seq:
                    raise RuntimeError(f"step {s} micro-batch {m} rank {ctx.rank}: DPOTrainer fed {got}, the spec "
                                       f"places sample {i} = {seq}")
                if half == 0 and cm is not None:
                    mk = cm[row, : len(seq)].tolist()
                    targets[str(i)] = [t for t in range(1, len(seq)) if mk[t]]
    return targets


def run(spec: Spec, init_path: Path, ctx: WorkerContext, knobs: Any) -> dict[str, Any]:
    import datasets
    import transformers
    import trl
    from transformers import Trainer
    from trl import DPOConfig, DPOTrainer

    smp = D.samples(spec)
    tok = C.build_tokenizer(spec)
    notes: list[str] = []
    rows = []
    for i in dataset_order(spec):
        s = smp[i]
        rows.append({"prompt": C.ids_to_text(s.prompt, spec), "chosen": " " + C.ids_to_text(s.response, spec),
                     "rejected": " " + C.ids_to_text(s.rejected, spec)})
    ds = datasets.Dataset.from_list(rows)
    args = C.common_args(spec, ctx, str(ctx.scratch / "dpo"), Trainer, None)
    args["gradient_checkpointing"] = knobs.gradient_checkpointing
    dpo = dict(beta=spec.rl.dpo_beta, loss_type=["sigmoid"], loss_weights=None, label_smoothing=0.0,
               max_length=None, max_prompt_length=None, max_completion_length=None, truncation_mode="keep_start",
               padding_free=False, precompute_ref_log_probs=False, disable_dropout=True, rpo_alpha=None,
               ld_alpha=None, use_weighting=False, sync_ref_model=False, reference_free=False,
               f_divergence_type="reverse_kl", use_logits_to_keep=False, dataset_num_proc=None,
               remove_unused_columns=False, shuffle_dataset=False)
    kwargs = C.normalise(DPOConfig, {**args, **dpo}, notes)
    cfg = DPOConfig(**kwargs)
    model = build_model(spec, init_path).to(ctx.torch_device)
    ref_model = build_model(spec, init_path).to(ctx.torch_device)
    model.train()
    cap = C.Capture()
    sig = inspect.signature(DPOTrainer.__init__).parameters
    tkw: dict[str, Any] = dict(model=model, ref_model=ref_model, args=cfg, train_dataset=ds,
                               callbacks=[C.step_callback(cap, ctx), C.make_callback(cap)])
    tkw["processing_class" if "processing_class" in sig else "tokenizer"] = tok
    if spec.optimizer.name == "sgd" and spec.optimizer.momentum:
        tkw["optimizers"] = (make_optimizer(spec, model.parameters()), None)
        notes.append("optimizer: torch.optim.SGD(momentum) passed to the Trainer (optimizers=)")
    trainer = DPOTrainer(**tkw)
    patches = []
    if "train_sampling_strategy" not in C.config_fields(DPOConfig):
        from torch.utils.data import SequentialSampler

        trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
        patches.append("Trainer._get_train_sampler (instance) -> SequentialSampler")
    C.hook_trainer(trainer, cap, grads_from_clip=True)
    trainer.train()
    return C.finish(spec, ctx, cap, trainer, notes, patches, extra={
        "trainer": "DPOTrainer", "config": {k: v for k, v in kwargs.items() if k != "output_dir"},
    }, code_path=f"trl.DPOTrainer.train (trl {trl.__version__}, transformers {transformers.__version__}, "
                 "sigmoid loss, explicit ref_model)", placement=check_placement)
