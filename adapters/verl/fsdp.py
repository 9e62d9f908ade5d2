"""What verl's legacy fsdp workers build around a model: the FSDP wrapping (verl's `apply_fsdp2` +
`fsdp2_load_full_state_dict`, or FSDP1 with verl's wrap policy; fp32 mixed precision) and the torch optimizer."""

from __future__ import annotations

from typing import Any

from stepdiff.harness.spec import Spec

from ..base import WorkerContext
from .common import optim_kwargs


def wrap_fsdp(model: Any, ctx: WorkerContext, strategy: str) -> Any:
    """The model wrapped the way verl's legacy fsdp workers wrap it."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ctx.device, mesh_shape=(ctx.world_size,), mesh_dim_names=("fsdp",))
    if strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from verl.utils.fsdp_utils import apply_fsdp2, fsdp2_load_full_state_dict

        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=True)
        full_state = model.state_dict()
        apply_fsdp2(model, {"mesh": mesh, "mp_policy": mp, "offload_policy": None,
                            "reshard_after_forward": True}, {"wrap_policy": {}})
        fsdp2_load_full_state_dict(model, full_state, mesh, None)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from verl.utils.fsdp_utils import get_fsdp_wrap_policy

    mp1 = MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
    return FSDP(model, auto_wrap_policy=get_fsdp_wrap_policy(module=model, config={}), device_id=ctx.torch_device
                if ctx.device == "cuda" else torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD,
                mixed_precision=mp1, sync_module_states=True, device_mesh=mesh, use_orig_params=True)


def torch_optimizer(spec: Spec, module: Any) -> Any:
    """What verl's legacy workers build: torch.optim.<name>(params, lr, weight_decay[, betas] + overrides)."""
    import torch

    kw = optim_kwargs(spec)
    args: dict[str, Any] = {"lr": kw["lr"], "weight_decay": kw["weight_decay"]}
    if "betas" in kw:
        args["betas"] = kw["betas"]
    args.update(kw["override_optimizer_config"])
    return getattr(torch.optim, kw["optimizer"])(module.parameters(), **args)
