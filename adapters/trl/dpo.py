"""DPO through trl.DPOTrainer (read-outs: `capture`).

DPOTrainer tokenises text `prompt` / `chosen` / `rejected` itself (there is no pre-tokenised path in TRL 1.x) and
appends EOS to a completion that does not end with it: the local WordLevel tokenizer makes the text round-trip to
exactly the spec's ids, and the adapter refuses (unsupported) samples whose completions do not end with EOS. The
frozen reference policy is an explicit `ref_model` built from the same initial weights (without it TRL tries to load
`config._name_or_path` from the Hub). loss_type sigmoid, beta = rl.dpo_beta, no label smoothing, no precomputed
reference log-probs, max_length None (no truncation), dropout disabled.
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
    if k.deepspeed_zero_stage:
        return "DPO under DeepSpeed is not wired in the adapter"
    if spec.data.supervise != "response":
        return "data.supervise = 'all': DPOTrainer's log-probs cover the completions only"
    eos = spec.data.eos_id
    for i, smp in enumerate(D.samples(spec)):
        if smp.response[-1] != eos or smp.rejected[-1] != eos:
            return (f"data.samples[{i}]: DPOTrainer appends EOS to a completion that does not end with it; "
                    "end every response and rejected with the EOS id")
    return None


def placement(spec: Spec, cap: Capture) -> dict[str, list[int]]:
    smp = D.samples(spec)
    targets: dict[str, list[int]] = {}
    for s, m, idx, inp in cap.fed(spec, "DPOTrainer"):
        ids, cm = inp["input_ids"], inp.get("completion_mask")
        if ids.shape[0] != 2 * len(idx):
            raise RuntimeError(f"step {s} micro-batch {m}: DPOTrainer fed {ids.shape[0]} rows for {len(idx)} pairs")
        for row, i in enumerate(idx):
            for half, resp in ((0, smp[i].response), (1, smp[i].rejected)):
                seq = [*smp[i].prompt, *resp]
                got = ids[half * len(idx) + row, : len(seq)].tolist()
                if got != seq:
                    raise RuntimeError(f"step {s} micro-batch {m} rank {cap.ctx.rank}: DPOTrainer fed {got}, the "
                                       f"spec places sample {i} = {seq}")
                if half == 0 and cm is not None:
                    mk = cm[row, : len(seq)].tolist()
                    targets[str(i)] = [t for t in range(1, len(seq)) if mk[t]]
    return targets


def config_request(spec: Spec, ctx: WorkerContext, knobs: TRLKnobs, trainer_cls: Any) -> dict[str, Any]:
    """DPOConfig's keyword arguments from the spec."""
    args = C.common_args(spec, ctx, str(ctx.scratch / "dpo"), trainer_cls, None, knobs.gradient_checkpointing)
    dpo = dict(beta=spec.rl.dpo_beta, loss_type=["sigmoid"], loss_weights=None, label_smoothing=0.0,
               max_length=None, max_prompt_length=None, max_completion_length=None, truncation_mode="keep_start",
               padding_free=False, precompute_ref_log_probs=False, disable_dropout=True, rpo_alpha=None,
               ld_alpha=None, use_weighting=False, sync_ref_model=False, reference_free=False,
               f_divergence_type="reverse_kl", use_logits_to_keep=False, dataset_num_proc=None,
               remove_unused_columns=False, shuffle_dataset=False)
    return {**args, **dpo}


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, knobs: TRLKnobs) -> Driven:
    import datasets
    import transformers
    import trl
    from transformers import Trainer
    from trl import DPOConfig, DPOTrainer

    smp = D.samples(spec)
    tok = C.build_tokenizer(spec)
    notes: list[str] = []
    rows = []
    for i in C.dataset_order(spec):
        s = smp[i]
        rows.append({"prompt": C.ids_to_text(s.prompt, spec), "chosen": " " + C.ids_to_text(s.response, spec),
                     "rejected": " " + C.ids_to_text(s.rejected, spec)})
    ds = datasets.Dataset.from_list(rows)
    absent: dict[str, str] = {}
    cfg, kwargs = C.trainer_config(DPOConfig, config_request(spec, ctx, knobs, Trainer), absent)
    model = build_model(spec, init_path).to(ctx.torch_device)
    ref_model = build_model(spec, init_path).to(ctx.torch_device)
    model.train()
    cap = Capture(ctx)
    trainer = DPOTrainer(**C.trainer_kwargs(spec, model, tok, DPOTrainer, notes, ref_model=ref_model, args=cfg,
                                            train_dataset=ds, callbacks=cap.callbacks()))
    patches = [p.target for p in C.sequential_sampler(trainer, DPOConfig)]
    run_trainer(trainer, cap, deepspeed=False)
    extra = {"trainer": "DPOTrainer", "config": {k: v for k, v in kwargs.items() if k != "output_dir"},
             "absent_config_fields": absent}
    code_path = (f"trl.DPOTrainer.train (trl {trl.__version__}, transformers {transformers.__version__}, "
                 "sigmoid loss, explicit ref_model)")
    return finish(spec, cap, trainer, notes, patches, extra, code_path, placement(spec, cap))
