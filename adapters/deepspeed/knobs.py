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


def zero_problem(stage_knob: str, stage: int, offload_knob: str, offload: bool, max_stage: int = 3,
                 why_max: str = "DeepSpeed has stages 0-3") -> str | None:
    """Why a ZeRO stage / optimizer-offload pair cannot run (every adapter that configures DeepSpeed checks it)."""
    if stage > max_stage:
        return f"{stage_knob} = {stage}: {why_max}"
    if offload and stage == 0:
        return f"{offload_knob} needs {stage_knob} >= 1 (DeepSpeed offloads ZeRO optimizer states)"
    return None
