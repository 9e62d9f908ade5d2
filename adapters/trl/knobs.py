"""Knobs of the TRL adapter (the `[trl]` table of a case file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stepdiff.harness.spec import doc


@dataclass(frozen=True)
class TRLKnobs:
    trainer: Literal["auto", "sft", "dpo", "grpo"] = doc(
        "auto", "TRL trainer; auto = from loss.kind (sft -> SFTTrainer, dpo -> DPOTrainer, policy -> GRPOTrainer).")
    grpo_loss_type: Literal["auto", "grpo", "dapo", "dr_grpo", "bnpo"] = doc(
        "auto", "GRPOConfig.loss_type; auto = from loss.aggregation (seq-mean-token-mean -> grpo, token-mean -> dapo, "
        "seq-mean-token-sum-norm -> dr_grpo). bnpo (per-local-batch token mean) matches only GA = world size = 1.")
    deepspeed_zero_stage: int = doc(0, "0 = no DeepSpeed; 1-2 = accelerate's DeepSpeed integration with that ZeRO "
                                       "stage (needs deepspeed in the version set).", minimum=0)
    offload_optimizer: Literal["none", "cpu"] = doc("none", "DeepSpeed ZeRO offload_optimizer device.")
    deepspeed_optimizer: Literal["config", "trainer"] = doc(
        "config", "With DeepSpeed: config = an optimizer block with 'auto' values in the DeepSpeed config, so "
        "DeepSpeed builds its own (DeepSpeedCPUAdam under offload, FusedAdam otherwise) on all parameters, as "
        "transformers' DeepSpeed docs configure it; trainer = no block: the Trainer's own optimizer "
        "(create_optimizer, norm weights and biases exempt from weight decay) handed to DeepSpeed.")
    gradient_checkpointing: bool = doc(False, "TrainingArguments.gradient_checkpointing (TRL defaults it on).")
