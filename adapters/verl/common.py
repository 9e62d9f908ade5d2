"""What the verl code paths share: the spec mapped onto verl's config knobs, the model directory verl loads, the
PPO batch in verl's left/right-padded layout, and the scalars verl reports. Framework imports happen inside the
functions.

Config normalisation (one spec onto verl's knobs): micro_batch_size_per_gpu = batch.micro_batch_size;
use_dynamic_bsz=False; shuffle False; no balancing; clipping set through both `optim.clip_grad` and the actor's
`grad_clip`; verl has no "off" switch for clipping, so clip_grad_norm = 0 becomes 1e9 (the clip coefficient clamps to
exactly 1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from ..base import WorkerContext
from ..common import ANY, build_model, step_rank_indices
from ..common import config_kwargs as take_config

CLIP_OFF = 1e9


def clip(spec: Spec) -> float:
    return float(spec.optimizer.clip_grad_norm) if spec.optimizer.clip_grad_norm > 0 else CLIP_OFF


def fsdp_strategy(strategy: str) -> str:
    """verl's name of the FSDP implementation: 'fsdp2', or 'fsdp' for FSDP1."""
    return "fsdp2" if strategy == "fsdp2" else "fsdp"


def optim_kwargs(spec: Spec) -> dict[str, Any]:
    o = spec.optimizer
    if o.name == "sgd":
        return dict(optimizer="SGD", optimizer_impl="torch.optim", lr=o.lr, weight_decay=o.weight_decay,
                    override_optimizer_config={"momentum": o.momentum})
    return dict(optimizer="AdamW", optimizer_impl="torch.optim", lr=o.lr, weight_decay=o.weight_decay,
                betas=tuple(o.betas), override_optimizer_config={"eps": o.eps})


ABSENT_OK: dict[str, tuple[Any, str]] = {
    # field: (the value that means "off" or ANY, why a release without the field runs as asked)
    "calculate_entropy": (False, "the release's actor config has no entropy switch; entropy_coeff = 0 is set"),
    "model_config": (ANY, "the critic reads its model config from TrainingWorkerConfig (set there)"),
}
"""verl config fields a release may lack without the run changing; any other absent field is `Unsupported`."""


def config_kwargs(cls: Any, kwargs: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The kwargs this release's config dataclass takes; an absent field is `Unsupported` unless ABSENT_OK says why
    its absence changes nothing (noted)."""
    absent: dict[str, str] = {}
    out = take_config(cls, kwargs, ABSENT_OK, absent)
    notes += [f"{field} absent in this release: {why}" for field, why in absent.items()]
    return out


def actor_config_kwargs(spec: Spec, strategy: str, mini_batch: int, use_remove_padding: bool) -> dict[str, Any]:
    """FSDPActorConfig's fields from the spec (the engine and the legacy actor both build one)."""
    b, rl = spec.batch, spec.rl
    return dict(strategy=fsdp_strategy(strategy), rollout_n=1, ppo_mini_batch_size=mini_batch,
                ppo_micro_batch_size_per_gpu=b.micro_batch_size, use_dynamic_bsz=False,
                loss_agg_mode=spec.loss.aggregation, clip_ratio=rl.clip_ratio_low, clip_ratio_low=rl.clip_ratio_low,
                clip_ratio_high=rl.clip_ratio_high, entropy_coeff=0.0, calculate_entropy=False, use_kl_loss=False,
                ppo_epochs=1, shuffle=False, use_torch_compile=False, use_remove_padding=use_remove_padding,
                grad_clip=clip(spec))


def model_dir(spec: Spec, init_path: Path, ctx: WorkerContext) -> tuple[Path, Any]:
    """The spec's initial model saved as an HF directory (safetensors) for verl to load; also returns the model
    (a 'shadow' used only to compute old log-probs / old values)."""
    model = build_model(spec, init_path)
    if spec.loss.kind == "value":
        model.config.classifier_dropout = 0.0
        model.dropout.p = 0.0
    d = ctx.scratch / f"model-{init_path.stem}-{spec.loss.kind}"
    model.save_pretrained(str(d), safe_serialization=True)
    model.eval()
    return d, model


def response_horizon(spec: Spec, step: int) -> int:
    smp = D.samples(spec)
    b = spec.batch
    longest = max(len(smp[i].response) for r in range(b.world_size) for i in step_rank_indices(spec, step, r))
    return max(longest, spec.rl.max_response_len)


def ppo_tensors(spec: Spec, step: int, ctx: WorkerContext, shadow: Any) -> dict[str, Any]:
    """verl's left/right-padded PPO batch of this rank's samples, in the spec's order."""
    import torch

    smp = D.samples(spec)
    rows = [smp[i] for i in step_rank_indices(spec, step, ctx.rank)]
    pad = spec.data.pad_id
    p_len = max(len(s.prompt) for s in rows)
    r_len = response_horizon(spec, step)
    n = len(rows)
    prompts = torch.full((n, p_len), pad, dtype=torch.long)
    responses = torch.full((n, r_len), pad, dtype=torch.long)
    p_mask = torch.zeros((n, p_len), dtype=torch.long)
    r_mask = torch.zeros((n, r_len), dtype=torch.long)
    for b, s in enumerate(rows):
        prompts[b, p_len - len(s.prompt):] = torch.tensor(s.prompt)
        p_mask[b, p_len - len(s.prompt):] = 1
        responses[b, : len(s.response)] = torch.tensor(s.response)
        r_mask[b, : len(s.response)] = 1
    input_ids = torch.cat([prompts, responses], dim=1)
    attention_mask = torch.cat([p_mask, r_mask], dim=1)
    position_ids = torch.clamp(torch.cumsum(attention_mask, dim=1) - 1, min=0)
    adv = torch.tensor([s.advantage for s in rows], dtype=torch.float32)[:, None] * r_mask
    out = dict(prompts=prompts, responses=responses, input_ids=input_ids, attention_mask=attention_mask,
               position_ids=position_ids, response_mask=r_mask, advantages=adv)
    # old log-probs / old values: a plain forward of the current weights (ratio 1, value clip inactive)
    with torch.no_grad():
        o = shadow(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if spec.loss.kind == "value":
            v = o.logits.squeeze(-1).float()[:, p_len - 1: p_len - 1 + r_len]
            out["values"] = v * r_mask
            out["returns"] = torch.tensor([s.value_target for s in rows], dtype=torch.float32)[:, None] * r_mask
        else:
            logits = o.logits.float()[:, p_len - 1: p_len - 1 + r_len]
            lp = torch.log_softmax(logits, dim=-1).gather(-1, responses[..., None]).squeeze(-1)
            out["old_log_probs"] = lp * r_mask
    return out


def load_shadow(shadow: Any, params: dict[str, Any]) -> None:
    """The shadow model takes the parameters after the step (the next step's old log-probs / values)."""
    import torch

    with torch.no_grad():
        for n, p in shadow.named_parameters():
            if n in params:
                p.copy_(params[n].to(p.dtype))


def scalar(x: Any) -> float:
    """A number verl reports (a tensor, a verl Metric, a list of per-micro-batch values summed), NaN when absent."""
    if x is None:
        return math.nan
    if isinstance(x, (list, tuple)):
        vals = [scalar(v) for v in x]
        return float(sum(vals)) if vals else math.nan
    if hasattr(x, "value"):  # verl.utils.metric.Metric
        return scalar(x.value)
    if hasattr(x, "item"):
        return float(x.item())
    return float(x)


def asdict(cfg: Any) -> Any:
    """The plain (JSON-able) fields of a verl config dataclass, for the record."""
    import dataclasses

    if cfg is None:
        return None
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[f.name] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float, str, bool)) for x in v):
            out[f.name] = list(v)
        elif isinstance(v, dict) and all(isinstance(x, (int, float, str, bool)) for x in v.values()):
            out[f.name] = dict(v)
    return out
