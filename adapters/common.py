"""Helpers every adapter uses inside its worker: the tiny model from the spec with the shared initial weights, the
spec's token loss, torch's optimizer from the spec, installed versions, the distributed environment variables, and
the spec's per-rank sample order. They build inputs and read versions; none of them is framework math.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepdiff._util import free_port
from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

if TYPE_CHECKING:
    import torch

    from stepdiff.harness.data import MicroBatch

    from .base import WorkerContext


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "float64": torch.float64}[name]


def build_model(spec: Spec, init_path: Path | None, dtype: str | None = None) -> Any:
    """A transformers LlamaForCausalLM from the spec's config, with the shared initial weights loaded strictly."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    from stepdiff.harness.model import hf_config

    cfg = LlamaConfig(**hf_config(spec))
    cfg._attn_implementation = spec.model.attn_implementation
    torch.manual_seed(spec.model.seed)
    model: Any
    if spec.loss.kind == "value":  # a value model: one scalar per token from the `score` head
        cfg.num_labels = 1
        model = LlamaForTokenClassification(cfg)
    else:
        model = LlamaForCausalLM(cfg)
    if init_path is not None:
        load_init(model, init_path)
    model.to(torch_dtype(dtype or spec.model.dtype))
    model.config.use_cache = False
    assert_no_dropout(model)
    return model


def assert_no_dropout(model: Any) -> None:
    """Every dropout must be 0: a random mask makes two runs differ by noise the fp64 calibration cannot see (same
    seed), so it would silently blur every comparison. (LlamaForTokenClassification defaults to 0.1.)"""
    import torch

    active = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if active:
        raise RuntimeError(f"dropout is active in {active[:3]}: every run must use dropout 0")


def make_optimizer(spec: Spec, params: Any) -> Any:
    """torch's SGD or AdamW configured from the spec (constant lr; clipping is applied separately). `params` may be
    parameter groups (see `param_groups`: optimizer.no_decay parameters get weight_decay 0)."""
    import torch

    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def param_groups(spec: Spec, named: Any) -> list[dict[str, Any]]:
    """Parameter groups from (name, parameter) pairs or a name -> parameter dict: those matching a pattern of
    optimizer.no_decay get weight_decay 0 (empty groups are left out)."""
    import re

    items = list(named.items()) if hasattr(named, "items") else list(named)
    skip = [p for n, p in items if any(re.search(x, n) for x in spec.optimizer.no_decay)]
    decay = [p for n, p in items if not any(re.search(x, n) for x in spec.optimizer.no_decay)]
    groups: list[dict[str, Any]] = [{"params": decay}] if decay else []
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0})
    return groups


STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def read_state(opt: Any, named: dict[str, Any],
               full: Callable[[Any], Any] | None = None) -> tuple[dict[str, dict[str, Any]], int | None]:
    """A torch-style optimizer's per-parameter state (exp_avg, exp_avg_sq, momentum_buffer) as fp32 CPU copies
    under canonical names, and its step counter (None when it keeps none); `full` turns a sharded state tensor into
    the whole one first (e.g. a DTensor's full_tensor, a collective)."""
    whole = full or (lambda t: t)
    state: dict[str, dict[str, Any]] = {}
    step = None
    for n, p in named.items():
        st = opt.state.get(p, {})
        kv = {k: whole(st[k]).detach().float().cpu().clone() for k in STATE_KEYS if k in st and st[k] is not None}
        if kv:
            state[n] = kv
        if "step" in st:
            step = int(float(whole(st["step"])))
    return state, step


def load_init(model: Any, init_path: Path) -> None:
    """Load the shared initial weights; a missing or unexpected parameter name is an error."""
    from safetensors.torch import load_file

    state = load_file(str(init_path))
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"initial weights do not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")


def token_loss_sum(model: Any, mb: MicroBatch, device: Any = None) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the supervised targets of a micro-batch, and their count.

    Computed in fp32 from the model's logits regardless of the model's dtype.
    """
    import torch

    dev = device if device is not None else next(model.parameters()).device
    ids = mb.input_ids.to(dev)
    out = model(input_ids=ids, attention_mask=mb.attention_mask.to(dev), use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = ids[:, 1:]
    mask = mb.loss_mask[:, 1:].to(dev).bool()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1).to(ce.dtype)).sum(), int(mask.sum().item())


def framework_versions(*dists: str) -> dict[str, str]:
    """Installed versions of the given distributions (and torch, transformers) in this worker's environment."""
    from importlib import metadata

    out = {}
    for d in ("torch", "transformers", *dists):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            pass
    return out


def set_dist_env(ctx: WorkerContext) -> None:
    """The variables torch.distributed and DeepSpeed read (already set by torchrun; set for world size 1)."""
    os.environ.setdefault("RANK", str(ctx.rank))
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(ctx.world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def step_rank_indices(spec: Spec, step: int, rank: int) -> list[int]:
    """The samples rank `rank` trains on in optimizer step `step`, micro-batch after micro-batch (the spec's order)."""
    return [i for m in range(spec.batch.grad_accum) for i in D.micro_batch_indices(spec, step, rank, m)]


def has_module(name: str) -> bool:
    """Whether `name` is importable here (False, not an error, when a parent package is absent)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


class _Any:
    """Marks an `absent_ok` entry whose absence is harmless whatever the wanted value."""

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()


def config_kwargs(cls: Any, wanted: dict[str, Any], absent_ok: dict[str, tuple[Any, str]],
                  absent: dict[str, str]) -> dict[str, Any]:
    """The keyword arguments of the release's config dataclass `cls` among `wanted`.

    A wanted field the release's `cls` does not have is `Unsupported` (the run would silently test something other
    than the spec), unless `absent_ok` names it with the value that means "off" (or ANY) and why a release without
    the field behaves as asked; those go into `absent` ({'Cls.field': why}) for the record."""
    import dataclasses

    from .base import Unsupported

    have = {f.name for f in dataclasses.fields(cls)}
    for name in sorted(k for k in wanted if k not in have):
        off, why = absent_ok.get(name, (None, ""))
        if not why or (off is not ANY and wanted[name] != off):
            raise Unsupported(f"{cls.__name__} of this release has no field {name!r} (wanted {wanted[name]!r}): "
                              "it cannot take this setting, so the run would not be the spec's")
        absent[f"{cls.__name__}.{name}"] = why
    return {k: v for k, v in wanted.items() if k in have}
