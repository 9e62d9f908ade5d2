"""Knobs of the DeepSpeed adapter (the `[deepspeed]` table of a case file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stepdiff.harness.spec import doc


@dataclass(frozen=True)
class DeepSpeedKnobs:
    zero_stage: int = doc(2, "ZeRO stage 0-3.", minimum=0)
    offload_optimizer: Literal["none", "cpu"] = doc("none", "ZeRO optimizer-state offload device.")
    overlap_comm: bool = doc(False, "ZeRO overlap_comm.")
    contiguous_gradients: bool = doc(True, "ZeRO contiguous_gradients.")
    reduce_bucket_size: int = doc(500000, "ZeRO reduce bucket size (elements).", minimum=1)
    allgather_bucket_size: int = doc(500000, "ZeRO all-gather bucket size (elements).", minimum=1)
    optimizer_source: Literal["config", "torch"] = doc(
        "config", "config: DeepSpeed builds its own optimizer from the config's `optimizer` block, as its users "
        "configure it (AdamW -> DeepSpeedCPUAdam under CPU offload, FusedAdam otherwise; SGD -> torch.optim.SGD "
        "through DeepSpeed's torch fallback); torch: a torch SGD/AdamW built outside DeepSpeed and handed to "
        "deepspeed.initialize (the optimizer under test is then torch's, not DeepSpeed's).")
    accumulation: Literal["engine", "boundary-calls"] = doc(
        "engine", "engine: gradient_accumulation_steps = batch.grad_accum and step() after every micro-batch "
        "(DeepSpeed finds the boundary); boundary-calls: gradient_accumulation_steps = 1 and batch.grad_accum "
        "backward() calls per optimizer step, set_gradient_accumulation_boundary(False, ..., True), one step().")
    grad_accum_dtype: Literal["default", "fp32", "bf16"] = doc(
        "default", "data_types.grad_accum_dtype (fp32 with bf16 at ZeRO-1 selects BF16_Optimizer).")


def zero_problem(stage_knob: str, stage: int, offload_knob: str, offload: bool, max_stage: int = 3,
                 why_max: str = "DeepSpeed has stages 0-3") -> str | None:
    """Why a ZeRO stage / optimizer-offload pair cannot run (every adapter that configures DeepSpeed checks it)."""
    if stage > max_stage:
        return f"{stage_knob} = {stage}: {why_max}"
    if offload and stage == 0:
        return f"{offload_knob} needs {stage_knob} >= 1 (DeepSpeed offloads ZeRO optimizer states)"
    return None
