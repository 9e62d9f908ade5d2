"""What the TRL trainers share: the local tokenizer, the Trainer configuration from the spec, the data placement and
the CPU patch of releases without a sequential sampler. Nothing here computes a loss: TRL's own trainers do.
Framework imports happen inside the functions (this module is imported on the host for the adapter's checks).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from ..base import Patch, WorkerContext
from ..common import config_kwargs, make_optimizer

HUGE_CLIP = 1e9
"""max_grad_norm used where the Trainer logs no grad norm without clipping: the clip coefficient clamps to exactly 1."""

SEQUENTIAL_SAMPLER = Patch(
    "Trainer._get_train_sampler (instance)", "returns SequentialSampler(train_dataset) on releases without "
    "TrainingArguments.train_sampling_strategy (transformers < 5)",
    "the Trainer's RandomSampler would reorder the spec's micro-batches; the dataset is laid out in the spec's "
    "placement (ranks dealt round-robin per micro-batch, as accelerate shards batches)")


def offline_env() -> None:
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
                 "TRL_EXPERIMENTAL_SILENCE": "1", "WANDB_DISABLED": "true"}.items():
        os.environ.setdefault(k, v)


def token(i: int, spec: Spec) -> str:
    d = spec.data
    return {d.pad_id: "<pad>", d.eos_id: "<eos>", d.bos_id: "<bos>"}.get(i, f"w{i}")


def ids_to_text(ids: Any, spec: Spec) -> str:
    return " ".join(token(int(i), spec) for i in ids)


def build_tokenizer(spec: Spec) -> Any:
    """A local WordLevel tokenizer: id i <-> token 'w{i}' (pad/eos/bos named), whitespace split, no specials added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token(i, spec): i for i in range(spec.model.vocab_size)}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<pad>", model_max_length=10**6)
    tok.padding_side = "right"
    for i in range(spec.model.vocab_size):  # the round trip the data relies on
        if tok.convert_tokens_to_ids(token(i, spec)) != i:
            raise RuntimeError(f"local tokenizer does not map {token(i, spec)!r} to {i}")
    return tok


def config_fields(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


ABSENT_OK: dict[str, tuple[Any, str]] = {
    # field: (the value that means "off", why a release without the field runs as asked)
    "overwrite_output_dir": (True, "output-directory handling only (removed in transformers 5)"),
    "group_by_length": (False, "no length-grouped sampler in the release (removed in transformers 5)"),
    "warmup_ratio": (0.0, "warmup_steps = 0 is set (transformers 5 has warmup_steps only)"),
    "train_sampling_strategy": ("sequential", "the trainer gets SEQUENTIAL_SAMPLER instead (sequential_sampler)"),
    "max_length": (None, "the release spells it max_seq_length (set: no truncation)"),
    "max_seq_length": (None, "the release spells it max_length (set to None: no truncation)"),
    "max_prompt_length": (None, "the release has no prompt truncation"),
    "max_completion_length": (None, "the release has no completion truncation (DPO)"),
    "activation_offloading": (False, "the release has no activation offloading"),
    "assistant_only_loss": (False, "the release has no assistant-only masks"),
    "pad_to_multiple_of": (None, "the release pads to the longest sequence only"),
    "padding_free": (False, "the release has no padding-free batching"),
    "shuffle_dataset": (False, "the release does not shuffle the dataset itself"),
    "ld_alpha": (None, "the release has no LD-DPO length weighting"),
    "loss_weights": (None, "the release has one DPO loss type, unweighted"),
    "use_weighting": (False, "the release has no WPO weighting"),
    "use_logits_to_keep": (False, "the release computes logits for every position"),
    "reference_free": (False, "the release always uses the reference model (ref_model is given)"),
    "rpo_alpha": (None, "the release has no RPO NLL term"),
    "use_liger_loss": (False, "the release has no separate Liger GRPO loss (use_liger_kernel = False is set)"),
}
"""Config fields a release may lack without the run changing: each is pinned to its "off" value, and the release
without it has no such feature. Any other absent field is `Unsupported` (see common.config_kwargs)."""


def trainer_config(cls: Any, wanted: dict[str, Any], absent: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """The release's TRL config (SFTConfig, DPOConfig, GRPOConfig) from `wanted`, refusing what it cannot take; and
    the keyword arguments it was built from."""
    kwargs = config_kwargs(cls, wanted, ABSENT_OK, absent)
    return cls(**kwargs), kwargs


def common_args(spec: Spec, ctx: WorkerContext, out_dir: str, trainer_cls: Any, ds_config: dict | None,
                gradient_checkpointing: bool) -> dict[str, Any]:
    """Every Trainer/TRL default that changes the numbers, set from the spec (the TRL config class filters)."""
    o, b = spec.optimizer, spec.batch
    clip = float(o.clip_grad_norm)
    # transformers >= 5 computes and logs the grad norm with clipping off (max_grad_norm=0); older releases only log
    # it when clipping, so there 1e9 stands for "off" (the clip coefficient is clamped to exactly 1.0).
    off = 0.0 if hasattr(trainer_cls, "_get_grad_norm") else HUGE_CLIP
    args: dict[str, Any] = dict(
        output_dir=out_dir, overwrite_output_dir=True,
        per_device_train_batch_size=b.micro_batch_size, gradient_accumulation_steps=b.grad_accum,
        max_steps=b.steps, num_train_epochs=1,
        learning_rate=o.lr, lr_scheduler_type="constant", warmup_steps=0, warmup_ratio=0.0,
        weight_decay=o.weight_decay,
        optim="sgd" if o.name == "sgd" else "adamw_torch",
        adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
        max_grad_norm=clip if clip > 0 else off,
        bf16=False, fp16=False, bf16_full_eval=False, tf32=None,
        gradient_checkpointing=gradient_checkpointing,
        use_cpu=ctx.device == "cpu",
        seed=spec.model.seed, data_seed=spec.model.seed,
        train_sampling_strategy="sequential", group_by_length=False,
        dataloader_num_workers=0, dataloader_drop_last=False, dataloader_pin_memory=False,
        logging_strategy="steps", logging_steps=1, logging_first_step=False, report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, torch_compile=False,
        include_num_input_tokens_seen=False, label_smoothing_factor=0.0,
        neftune_noise_alpha=None, use_liger_kernel=False,
    )
    if ctx.device == "cpu" and ctx.world_size > 1:
        args["ddp_backend"] = "gloo"
    if ds_config is not None:
        args["deepspeed"] = ds_config
    return args


TRAINER_NO_DECAY = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
"""transformers' Trainer.get_decay_parameter_names: names matching these (and nn.LayerNorm weights) get no weight
decay; older releases exempt biases and ALL_LAYERNORM_LAYERS (LlamaRMSNorm included): the same Llama parameters."""


def ds_config(spec: Spec, stage: int, offload: str, optimizer: str = "config") -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": False}
    if offload != "none":
        zero["offload_optimizer"] = {"device": offload, "pin_memory": False}
    extra: dict[str, Any] = {}
    if optimizer == "config":  # DeepSpeed builds its own; transformers fills the 'auto' values from the arguments
        o = spec.optimizer
        extra["optimizer"] = ({"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}} if o.name == "adamw" else
                              {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto", "momentum": o.momentum}})
    return {**extra,
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }


def dataset_order(spec: Spec) -> list[int]:
    """Sample indices in the order the (sequential) Trainer dataloader must see them: per step, per micro-batch, the
    ranks' micro-batches in rank order (accelerate deals batches round-robin to ranks)."""
    b = spec.batch
    return [i for s in range(b.steps) for m in range(b.grad_accum) for r in range(b.world_size)
            for i in D.micro_batch_indices(spec, s, r, m)]


def trainer_kwargs(spec: Spec, model: Any, tok: Any, trainer_cls: Any, notes: list[str], **kw: Any) -> dict[str, Any]:
    """The trainer's keyword arguments: the tokenizer under the release's name for it, and torch's SGD with momentum
    handed over explicitly (transformers 4.x's "sgd" ignores optim_args, so momentum would be dropped)."""
    import inspect

    params = inspect.signature(trainer_cls.__init__).parameters
    out: dict[str, Any] = dict(model=model, **kw)
    out["processing_class" if "processing_class" in params else "tokenizer"] = tok
    if spec.optimizer.name == "sgd" and spec.optimizer.momentum:
        out["optimizers"] = (make_optimizer(spec, model.parameters()), None)
        notes.append("optimizer: torch.optim.SGD(momentum) passed to the Trainer (optimizers=)")
    return out


def sequential_sampler(trainer: Any, config_cls: Any) -> list[Patch]:
    """On releases without `train_sampling_strategy`: the trainer instance samples its dataset in order."""
    if "train_sampling_strategy" in config_fields(config_cls):
        return []
    from torch.utils.data import SequentialSampler

    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
    return [SEQUENTIAL_SAMPLER]
