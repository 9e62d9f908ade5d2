"""TRL adapter (skeleton while being written)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stepdiff.harness.spec import doc

from .base import Adapter, Capabilities


@dataclass(frozen=True)
class TRLKnobs:
    trainer: Literal["auto", "sft", "dpo", "grpo"] = doc("auto", "TRL trainer; auto = from loss.kind.")


class TRLAdapter(Adapter):
    name = "trl"
    capabilities = Capabilities(framework="trl", runs="(in progress)", readouts=())

    @classmethod
    def requirements(cls, version: str | None) -> list[str]:
        return [f"trl=={version}" if version else "trl", "rich", "requests"]

    @classmethod
    def build_env(cls, version: str | None) -> dict[str, str]:
        return {"DS_BUILD_OPS": "0"}
