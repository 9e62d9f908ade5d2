"""Read-outs shared by the adapters: how gradients and parameters are copied out of a framework's own objects.

Every function here copies tensors the framework already holds (unsharded, fp32, on the CPU); none writes anything
back, and none imports a framework at module import time.

- `wrapped`: replace a method (of a class, an instance or a module) by a wrapper for the duration of a `with`, and
  always restore exactly what was there (an inherited or class-level method is not left behind as an instance or
  subclass attribute).
- DeepSpeed: `deepspeed_grads` (safe_get_full_grad of every parameter: after accumulation and the ZeRO reduce,
  unsharded at any stage; every rank must call it because ZeRO-3 gathers) and `deepspeed_params` (ZeRO-3 gathers the
  partitioned parameters first).
- FSDP: `fsdp_full` (FSDP2 DTensor.full_tensor(); FSDP1 inside summon_full_params(with_grads=...)).
- Plain torch modules (DDP or not): `module_grads`, `module_params`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@contextlib.contextmanager
def wrapped(owner: Any, attr: str, make: Callable[[Any], Any]) -> Iterator[Any]:
    """Within the block, `owner.attr` is `make(original)`; afterwards exactly what was there before.

    `original` is the raw attribute when `owner` holds it itself (a class's function, a module's function), otherwise
    what attribute lookup gives (an instance's bound method, an inherited function)."""
    own = vars(owner) if hasattr(owner, "__dict__") else {}
    had_own = attr in own
    before = own[attr] if had_own else None
    original = before if had_own else getattr(owner, attr)
    replacement = make(original)
    setattr(owner, attr, replacement)
    try:
        yield replacement
    finally:
        if had_own:
            setattr(owner, attr, before)
        else:
            delattr(owner, attr)


def _copy(t: Any) -> Any:
    return t.detach().float().cpu().clone()


def deepspeed_grads(engine: Any) -> dict[str, Any]:
    """Accumulated, DP-reduced, pre-clip gradients of a DeepSpeedEngine's parameters (every rank must call).

    Under BF16_Optimizer (bf16 + grad_accum_dtype fp32 at ZeRO-1) `safe_get_full_grad` returns the bf16 .grad of the
    last micro-batch alone (it prefers param.grad), so the read-out takes the fp32 accumulators the optimizer steps
    with instead: each element from the rank whose partition owns it (`bf16_stitched_grads`)."""
    from deepspeed.utils import safe_get_full_grad

    if hasattr(engine.optimizer, "fp32_groups_gradient_dict") and hasattr(engine.optimizer, "bf16_groups"):
        return bf16_stitched_grads(engine)
    out = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        if g is None:
            g = p.grad
        if g is None:
            raise RuntimeError(f"no gradient for {name} before the optimizer step (safe_get_full_grad returned None)")
        out[name] = _copy(g)
    return out


def bf16_stitched_grads(engine: Any) -> dict[str, Any]:
    """BF16_Optimizer's fp32 gradient accumulators, as its step uses them: every rank updates its own partition from
    its own accumulator, so element i comes from the rank owning i (a collective: zeros elsewhere, summed)."""
    import torch
    import torch.distributed as dist

    opt = engine.optimizer
    where: dict[int, tuple[Any, int, int]] = {}  # id(param) -> (its fp32 accumulator, owned start, owned end)
    for i, group in enumerate(opt.bf16_groups):
        dp = opt.real_dp_process_group[i]
        ws, rank = dist.get_world_size(group=dp), dist.get_rank(group=dp)
        size = opt.bf16_groups_flat[i].numel() // ws
        lo, hi = rank * size, (rank + 1) * size
        offset = 0
        for j, lp in enumerate(group):
            n = lp.numel()
            where[id(lp)] = (opt.fp32_groups_gradients[i][j], max(lo, offset) - offset, min(hi, offset + n) - offset)
            offset += n
    out = {}
    for name, p in engine.module.named_parameters():
        buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        acc, start, end = where[id(p)]
        if end > start:
            buf[start:end] = acc.reshape(-1)[start:end].float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(buf)
        out[name] = _copy(buf.reshape(p.shape))
    return out


def deepspeed_params(engine: Any) -> dict[str, Any]:
    """Unsharded fp32 copies of a DeepSpeedEngine's parameters (ZeRO-3 gathers them; every rank must call)."""
    import deepspeed

    params = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: _copy(p) for n, p in params}
    return {n: _copy(p) for n, p in params}


def deepspeed_state(engine: Any, keys: tuple[str, ...]) -> tuple[dict[str, dict[str, Any]], int | None]:
    """The optimizer state of a DeepSpeedEngine per parameter (`keys`, e.g. Adam's exp_avg and exp_avg_sq), gathered
    across ZeRO partitions and from CPU offload by `safe_get_full_optimizer_state` (a collective: every rank calls it,
    only after every rank has confirmed its fragments hold those keys), or read from the optimizer itself when it
    steps the module's own parameters (ZeRO stage 0 in fp32); and the optimizer's step counter. Empty where neither
    reaches (the fp16/bf16 stage-0 wrappers keep state on flat copies).

    ZeRO-1/2 link the fragments to the optimizer's state lazily, inside their first `_optimizer_step(group)`, while
    the optimizer's param_groups are narrowed to that one group: only the first parameter group gets linked (0.18,
    0.19; harmless to training, fatal to this read-out with a no-decay group). The read-out re-links every group
    (`_lazy_init_hp_params_optimizer_state` with the flag cleared: it only makes views, no state is changed)."""
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_optimizer_state

    state: dict[str, dict[str, Any]] = {}
    basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
    named = list(engine.module.named_parameters())
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if callable(link) and keys and getattr(basic, "state", None):
        engine.optimizer._hp_optimizer_states_linked = False
        link()
    ready = all(getattr(p, "_hp_mapping", None) is None
                or all(k in getattr(p._hp_mapping, "optim_fragment", {}) for k in keys) for _, p in named)
    flag = torch.tensor([1.0 if ready else 0.0], device=next(engine.module.parameters()).device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    gather = bool(flag.item()) and keys
    for name, p in named:
        own = engine.optimizer.state.get(p) if hasattr(engine.optimizer, "state") else None
        kv = {}
        for key in keys:
            t = None
            if own:
                t = own.get(key)
            elif gather:
                t = safe_get_full_optimizer_state(p, key)
            if t is not None:
                kv[key] = _copy(t)
        if kv:
            state[name] = kv
    steps = {int(float(st["step"])) for st in getattr(basic, "state", {}).values() if "step" in st}
    steps |= {int(float(g["step"])) for g in getattr(basic, "param_groups", []) if "step" in g}
    return state, (steps.pop() if len(steps) == 1 else None)


def deepspeed_master_params(engine: Any) -> dict[str, Any] | None:
    """The float32 master weights of a low-precision DeepSpeedEngine, under the module's names (every rank must call:
    ZeRO gathers them), or None when the module's parameters are the only copy (float32 runs). Sources: ZeRO-1/2/3 and
    BF16_Optimizer `safe_get_full_fp32_param`; the ZeRO-0 fp16/bf16 wrappers' fp32 groups (FP16_UnfusedOptimizer:
    one fp32 tensor per parameter; FP16_Optimizer: one flat fp32 tensor per group)."""
    from deepspeed.utils import safe_get_full_fp32_param

    named = list(engine.module.named_parameters())
    if all(p.dtype == _torch_float32() for _, p in named):
        return None
    opt = engine.optimizer
    out: dict[str, Any] = {}
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer
        by_id = {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                 for lp, hp in zip(lg, hg, strict=True)}
        return {n: _copy(by_id[id(p)]) for n, p in named if id(p) in by_id} or None
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups_flat"):  # FP16_Optimizer
        by_id = {}
        for lg, flat in zip(opt.fp16_groups, opt.fp32_groups_flat, strict=True):
            offset = 0
            for lp in lg:
                by_id[id(lp)] = flat.narrow(0, offset, lp.numel()).view_as(lp)
                offset += lp.numel()
        return {n: _copy(by_id[id(p)]) for n, p in named if id(p) in by_id} or None
    for name, p in named:
        t = safe_get_full_fp32_param(p)
        if t is None:
            return None
        out[name] = _copy(t)
    return out


def _torch_float32() -> Any:
    import torch

    return torch.float32


def deepspeed_optimizer(engine: Any, built_by: str) -> str:
    """'module.Class' of the optimizer that stepped, inside DeepSpeed's wrapper, and who built it."""
    basic = getattr(engine, "basic_optimizer", None) or getattr(engine.optimizer, "optimizer", engine.optimizer)
    wrapper = type(engine.optimizer)
    inner = f"{type(basic).__module__}.{type(basic).__name__}"
    via = f" inside {wrapper.__name__}" if wrapper is not type(basic) else ""
    return f"{inner}{via} ({built_by})"


def canonical_name(name: str) -> str:
    """A parameter name without the wrapper modules FSDP1, activation checkpointing and torch.compile insert."""
    for junk in _WRAPPER_NAMES:
        name = name.replace(junk, "")
    return name


def fsdp_full(module: Any, what: str) -> dict[str, Any]:
    """Unsharded fp32 copies of an FSDP1/FSDP2 module's parameters (`what` = 'param') or gradients ('grad') under
    canonical names. A parameter without a gradient is left out, never zero-filled: the harness reports a missing
    gradient as an error (or accepts it where the reference's gradient is exactly zero too). A collective: every rank
    calls it (a parameter's .grad is None on every rank or on none)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        from torch.distributed._tensor import DTensor
    fsdp1 = isinstance(module, FSDP)
    gather = (FSDP.summon_full_params(module, writeback=False, with_grads=(what == "grad")) if fsdp1
              else contextlib.nullcontext())
    out = {}
    with gather:
        for n, p in module.named_parameters():
            t = p if what == "param" else p.grad
            if t is None:
                continue
            if isinstance(t, DTensor):
                t = t.full_tensor()
            out[canonical_name(n)] = _copy(t)
    return out


def fsdp_optimizer_state(optimizer: Any, module: Any) -> tuple[dict[str, dict[str, Any]], int | None]:
    """A torch optimizer's per-parameter state over an FSDP2 module (exp_avg, exp_avg_sq, momentum_buffer: DTensor
    shards gathered, fp32 CPU copies under canonical names) and its step counter. A collective, like `fsdp_full`.
    FSDP1 keeps state per flat-parameter shard: not read ({}, None), so the state is reported as not compared."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from .common import read_state

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        from torch.distributed._tensor import DTensor
    if optimizer is None or isinstance(module, FSDP):
        return {}, None
    return read_state(optimizer, {canonical_name(n): p for n, p in module.named_parameters()},
                      full=lambda t: t.full_tensor() if isinstance(t, DTensor) else t)


def _unwrapped_parameters(model: Any) -> list[tuple[str, Any]]:
    """Named parameters of the model inside DDP/accelerate wrappers (`.module` until the causal LM)."""
    m = model
    while hasattr(m, "module") and not hasattr(m, "lm_head"):
        m = m.module
    return list(m.named_parameters())


def module_grads(model: Any) -> dict[str, Any]:
    """fp32 copies of a (possibly DDP-wrapped) module's .grad. A parameter without one is left out, never zero-filled
    (the harness reports it as a missing gradient)."""
    return {n: _copy(p.grad) for n, p in _unwrapped_parameters(model) if p.grad is not None}


def torch_optimizer_state(optimizer: Any, model: Any) -> tuple[dict[str, dict[str, Any]], int | None]:
    """A torch optimizer's per-parameter state (exp_avg, exp_avg_sq, momentum_buffer) under the (possibly
    DDP-wrapped) module's parameter names, and its step counter; unwraps accelerate's AcceleratedOptimizer."""
    from .common import read_state

    inner = getattr(optimizer, "optimizer", optimizer)
    return read_state(inner, dict(_unwrapped_parameters(model)))


def module_params(model: Any) -> dict[str, Any]:
    """fp32 copies of a (possibly DDP-wrapped) module's parameters."""
    return {n: _copy(p) for n, p in _unwrapped_parameters(model)}
