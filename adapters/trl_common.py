"""Shared pieces of the TRL adapter: the local tokenizer, config normalisation, the read-out hooks and the
micro-batch placement check. Imported only inside a worker (it imports torch/transformers at module level of its
functions, never at import time of this module's callers on the host).

Nothing here computes a loss: TRL's own trainers do. The hooks only copy tensors out.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from .base import WorkerContext

HUGE_CLIP = 1e9
"""max_grad_norm used where the Trainer logs no grad norm without clipping: the clip coefficient clamps to exactly 1."""


def offline_env() -> None:
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
                 "TRL_EXPERIMENTAL_SILENCE": "1", "WANDB_DISABLED": "true"}.items():
        os.environ.setdefault(k, v)


def version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


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


def normalise(cls: Any, wanted: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The keyword arguments of `cls` (a TrainingArguments subclass) among `wanted`; the absent ones are noted."""
    have = config_fields(cls)
    absent = sorted(k for k in wanted if k not in have)
    if absent:
        notes.append(f"{cls.__name__} of this release has no {', '.join(absent)} (left out)")
    return {k: v for k, v in wanted.items() if k in have}


def common_args(spec: Spec, ctx: WorkerContext, out_dir: str, trainer_cls: Any, ds_config: dict | None) -> dict:
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
        gradient_checkpointing=False,
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


def ds_config(spec: Spec, stage: int, offload: str) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": False}
    if offload != "none":
        zero["offload_optimizer"] = {"device": offload, "pin_memory": False}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }


class Capture:
    """What the hooks copy out of a Trainer run: gradients at the read-out point, the framework's raw per-micro-batch
    loss contributions (what it accumulates into the logged loss), its logs, parameters after each step, and the
    micro-batches it fed (for the placement check and the supervised targets)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, Any]] = []
        self.params: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self._running = 0.0
        self.micro_inputs: list[dict[str, Any]] = []
        self.num_items: list[Any] = []
        self.readout_calls = 0
        self.excluded: list[int] = []


def named_params(model: Any) -> list[tuple[str, Any]]:
    m = model
    while hasattr(m, "module") and not hasattr(m, "lm_head"):
        m = m.module
    return list(m.named_parameters())


def grads_of(model: Any) -> dict[str, Any]:
    import torch

    out = {}
    for n, p in named_params(model):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[n] = g.detach().float().cpu().clone()
    return out


def params_of(model: Any) -> dict[str, Any]:
    return {n: p.detach().float().cpu().clone() for n, p in named_params(model)}


def make_callback(cap: Capture) -> Any:
    from transformers import TrainerCallback

    class _Record(TrainerCallback):  # parameters after each optimizer step, and the Trainer's own logs
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            cap.params.append(params_of(model))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs:
                cap.logs.append(dict(logs))

    return _Record()


def hook_trainer(trainer: Any, cap: Capture, grads_from_clip: bool) -> None:
    """Instance-level wrappers (no math): training_step's return (what the Trainer adds to the logged loss),
    compute_loss's inputs, and accelerator.clip_grad_norm_ (gradients after accumulation, before clipping)."""
    orig_step = trainer.training_step
    orig_loss = trainer.compute_loss

    def training_step(*a: Any, **k: Any) -> Any:
        out = orig_step(*a, **k)
        cap._running += float(out.detach().float().sum()) if hasattr(out, "detach") else float(out)
        return out

    def compute_loss(model: Any, inputs: Any, *a: Any, **k: Any) -> Any:
        cap.micro_inputs.append({key: v.detach().cpu().clone() for key, v in inputs.items() if hasattr(v, "detach")})
        cap.num_items.append(k.get("num_items_in_batch"))
        return orig_loss(model, inputs, *a, **k)

    trainer.training_step = training_step
    trainer.compute_loss = compute_loss
    if grads_from_clip:
        acc = trainer.accelerator
        orig_clip = acc.clip_grad_norm_

        def clip_grad_norm_(parameters: Any, max_norm: Any, *a: Any, **k: Any) -> Any:
            params = list(parameters)
            cap.readout_calls += 1
            if len(cap.grads) == len(cap.step_losses):  # once per optimizer step: the first call
                cap.grads.append(grads_of(trainer.model))
            return orig_clip(params, max_norm, *a, **k)

        acc.clip_grad_norm_ = clip_grad_norm_


def close_step(cap: Capture, ctx: WorkerContext) -> None:
    """End of an optimizer step: the summed micro-batch losses, averaged over ranks as the Trainer logs them."""
    import torch
    import torch.distributed as dist

    total = torch.tensor([cap._running], dtype=torch.float64)
    if ctx.world_size > 1 and dist.is_initialized():
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
        total = total / ctx.world_size
    cap.step_losses.append(float(total.cpu()))
    cap._running = 0.0


def step_callback(cap: Capture, ctx: WorkerContext) -> Any:
    from transformers import TrainerCallback

    class _Close(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            close_step(cap, ctx)

    return _Close()


_DS_ACTIVE: list[Capture] = []


def hook_deepspeed_engine() -> None:
    """Read-out under DeepSpeed: accelerate calls engine.step() inside the boundary micro-batch's backward, so the
    Trainer's clip/callback points come after the step. DeepSpeedEngine.step is wrapped (class level, once) to copy
    `safe_get_full_grad` of every parameter before the boundary step runs (after accumulation and the ZeRO reduce,
    before unscale/clip/step; every rank calls it)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad

    if getattr(DeepSpeedEngine, "_stepdiff_readout", False):
        return
    orig = DeepSpeedEngine.step

    def step(self: Any, *a: Any, **k: Any) -> Any:
        if _DS_ACTIVE and self.is_gradient_accumulation_boundary():
            cap = _DS_ACTIVE[-1]
            grads = {}
            for n, p in self.module.named_parameters():
                g = safe_get_full_grad(p)
                if g is None:
                    raise RuntimeError(f"safe_get_full_grad returned None for {n}")
                grads[n] = g.detach().float().cpu().clone()
            cap.grads.append(grads)
            cap.readout_calls += 1
        return orig(self, *a, **k)

    DeepSpeedEngine.step = step
    DeepSpeedEngine._stepdiff_readout = True


def check_sft_placement(spec: Spec, ctx: WorkerContext, cap: Capture) -> dict[str, list[int]]:
    """Every micro-batch the Trainer fed on this rank must be the spec's, in order. Returns the supervised targets
    (positions whose label is not -100) per sample index, as the framework supervised them."""
    smp = D.samples(spec)
    b = spec.batch
    expected = [(s, m) for s in range(b.steps) for m in range(b.grad_accum)]
    if len(cap.micro_inputs) != len(expected):
        raise RuntimeError(f"TRL ran {len(cap.micro_inputs)} micro-batches on rank {ctx.rank}; the spec has "
                           f"{len(expected)}")
    targets: dict[str, list[int]] = {}
    for (s, m), inp in zip(expected, cap.micro_inputs, strict=True):
        idx = D.micro_batch_indices(spec, s, ctx.rank, m)
        ids = inp["input_ids"]
        if ids.shape[0] != len(idx):
            raise RuntimeError(f"step {s} micro-batch {m} on rank {ctx.rank}: {ids.shape[0]} rows, spec has "
                               f"{len(idx)}")
        for row, i in enumerate(idx):
            seq = [*smp[i].prompt, *smp[i].response]
            got = ids[row, : len(seq)].tolist()
            n_attn = int(inp["attention_mask"][row].sum()) if "attention_mask" in inp else len(seq)
            if got != seq or n_attn != len(seq):
                raise RuntimeError(f"step {s} micro-batch {m} on rank {ctx.rank} row {row}: TRL fed {got} "
                                   f"(attention {n_attn}), the spec places sample {i} = {seq}: the sampler reordered "
                                   "the data")
            if "labels" in inp:
                lab = inp["labels"][row, : len(seq)].tolist()
                targets[str(i)] = [t for t in range(1, len(seq)) if lab[t] != -100]
    return targets


def finish(spec: Spec, ctx: WorkerContext, cap: Capture, trainer: Any, notes: list[str], patches: list[str],
           extra: dict[str, Any], code_path: str, placement: Any = None) -> dict[str, Any]:
    """Check that every step happened once and assemble the adapter's per-step outputs."""
    b = spec.batch
    step_logs = [lg for lg in cap.logs if "loss" in lg and "train_runtime" not in lg]
    problems = []
    if len(cap.grads) != b.steps:
        problems.append(f"{len(cap.grads)} gradient read-outs for {b.steps} steps")
    if len(cap.params) != b.steps or len(cap.step_losses) != b.steps:
        problems.append(f"{len(cap.params)} parameter read-outs and {len(cap.step_losses)} step ends for "
                        f"{b.steps} steps")
    if len(step_logs) != b.steps:
        problems.append(f"{len(step_logs)} Trainer log lines with a loss for {b.steps} steps")
    if problems:
        raise RuntimeError("TRL did not run the spec's steps: " + "; ".join(problems))
    n_proc = getattr(trainer.accelerator, "num_processes", None)
    if n_proc != ctx.world_size:
        raise RuntimeError(f"accelerate runs {n_proc} processes, the spec's world size is {ctx.world_size}")
    warnings: list[str] = list(notes)
    logged = [float(lg["loss"]) for lg in step_logs]
    for s, (raw, lg) in enumerate(zip(cap.step_losses, logged, strict=True)):
        if abs(raw - lg) > 1e-4 * max(1.0, abs(raw)) + 5e-5:
            warnings.append(f"step {s}: logged loss {lg} differs from the Trainer's accumulated loss {raw}")
    norms = [float(lg["grad_norm"]) if lg.get("grad_norm") is not None else None for lg in step_logs]
    targets = placement(spec, ctx, cap) if placement is not None else {}
    if targets:
        extra["supervised_targets"] = targets
    extra["logged_loss"] = logged
    extra["num_items_in_batch"] = [None if n is None else float(n) for n in cap.num_items]
    extra["average_tokens_across_devices"] = getattr(trainer.args, "average_tokens_across_devices", "absent")
    extra["readout_calls"] = cap.readout_calls
    extra["accelerate_distributed_type"] = str(getattr(trainer.accelerator, "distributed_type", ""))
    extra["accelerate_num_processes"] = n_proc
    extra["model_accepts_loss_kwargs"] = getattr(trainer, "model_accepts_loss_kwargs", "absent")
    import transformers

    # the loss the Trainer logs; transformers < 5 rounds it to 4 decimals, so there the same quantity unrounded (the
    # sum of training_step's returns, mean over ranks: what the Trainer accumulates before rounding)
    rounded = version_tuple(transformers.__version__) < (5,)
    losses = cap.step_losses if rounded else logged
    extra["loss_source"] = ("Trainer tr_loss accumulation (training_step returns), unrounded" if rounded
                            else "Trainer log 'loss'")
    extra["accumulated_loss"] = cap.step_losses
    return {"losses": losses, "grad_norms": norms, "grads": cap.grads, "params": cap.params,
            "patches": patches, "warnings": warnings, "extra": extra, "code_path": code_path,
            "readout": "clip_grad_norm_ wrapper" if not extra.get("ds_config") else
            "DeepSpeedEngine.step wrapper: safe_get_full_grad before the boundary step"}
