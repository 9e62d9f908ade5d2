"""Knobs of the OpenRLHF adapter (the `[openrlhf]` table of a case file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stepdiff.harness.spec import doc


@dataclass(frozen=True)
class OpenRLHFKnobs:
    zero_stage: int = doc(2, "--ds.zero_stage: DeepSpeed ZeRO stage 0-3 (OpenRLHF's default 2).", minimum=0)
    adam_offload: bool = doc(False, "--ds.adam_offload: optimizer states and step on the CPU (ZeRO offload, "
                                    "DeepSpeedCPUAdam); with DeepSpeed <= 0.18.9 and grad_accum >= 3 this is the "
                                    "offload accumulation bug's path.")
    overlap_comm: bool = doc(False, "--ds.overlap_comm.")
    readout: Literal["hooks", "adam-delta"] = doc(
        "hooks", "Gradient read-out: 'hooks' = safe_get_full_grad around DeepSpeed's optimizer step; 'adam-delta' = "
                 "black box, the gradient recovered from OpenRLHF's saved per-step checkpoints through the AdamW "
                 "update (needs optimizer.name = adamw, a large eps, betas (0, 0) beyond one step).")
    seed: int = doc(42, "--train.seed: seeds OpenRLHF's sampler shuffle (the data order is compensated for it).")
    adam_impl: Literal["deepspeed", "torch"] = doc(
        "deepspeed", "'deepspeed' = the optimizer OpenRLHF's config makes DeepSpeed build (FusedAdam, DeepSpeedCPUAdam "
                     "with adam_offload; JIT-compiled on CPU, 1-4 min once per environment); 'torch' = DeepSpeed's "
                     "documented optimizer.params.torch_adam = true (+ zero_force_ds_cpu_optimizer = false) added to "
                     "OpenRLHF's DeepSpeed config: torch.optim.AdamW, no compile. Gradients are read before either.")
