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
    """Accumulated, DP-reduced, pre-clip gradients of a DeepSpeedEngine's parameters (every rank must call)."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        if g is None:
            g = p.grad
        if g is None:
            raise RuntimeError(f"no gradient for {name} before the optimizer step (safe_get_full_grad returned None)")
        out[name] = _copy(g)
    return out


def deepspeed_params(engine: Any) -> dict[str, Any]:
    """Unsharded fp32 copies of a DeepSpeedEngine's parameters (ZeRO-3 gathers them; every rank must call)."""
    import deepspeed

    params = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: _copy(p) for n, p in params}
    return {n: _copy(p) for n, p in params}


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


def module_params(model: Any) -> dict[str, Any]:
    """fp32 copies of a (possibly DDP-wrapped) module's parameters."""
    return {n: _copy(p) for n, p in _unwrapped_parameters(model)}
