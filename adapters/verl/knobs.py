"""Knobs of the verl adapter (the `[verl]` table of a case file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stepdiff.harness.spec import doc


@dataclass(frozen=True)
class VerlKnobs:
    path: Literal["sft", "actor", "critic"] = doc("sft", "Which verl training path runs (must match loss.kind: sft, "
                                                         "policy, value).")
    impl: Literal["auto", "engine", "legacy"] = doc(
        "auto", "verl's model-engine TrainingWorker (>= 0.7), the legacy fsdp_sft_trainer (<= 0.6) / dp_actor "
        "(<= 0.7), or auto: the release's own default (legacy SFT trainer while it ships, legacy actor while "
        "use_legacy_worker_impl=auto picks it (<= 0.7), the engine otherwise; the critic is always the engine).")
    strategy: Literal["fsdp2", "fsdp1"] = doc("fsdp2", "FSDP implementation (fsdp1 at world size 1 only).")
    use_remove_padding: bool = doc(True, "verl's use_remove_padding (packed sequences); 0.7.x engine without it "
                                         "builds the attention mask from the padded response mask.")
    dataset: Literal["auto", "single-turn", "multi-turn"] = doc(
        "auto", "SFT: which verl dataset reads the spec's samples: SFTDataset (prompt/response columns; legacy "
        "trainer only), MultiTurnSFTDataset (a user/assistant conversation), or auto: the trainer's default "
        "(SFTDataset for the legacy fsdp_sft_trainer, MultiTurnSFTDataset for the engine SFTTrainer).")
