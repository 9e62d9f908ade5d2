"""verl adapter (work in progress skeleton)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stepdiff.harness.spec import Spec, doc

from .base import Adapter, Capabilities


@dataclass(frozen=True)
class VerlKnobs:
    path: Literal["sft", "actor", "critic"] = doc("sft", "Which verl training path runs.")
    impl: Literal["engine", "legacy"] = doc("engine", "verl's model-engine workers, or the legacy trainer/actor.")
    strategy: Literal["fsdp2", "fsdp1"] = doc("fsdp2", "FSDP implementation.")
    use_remove_padding: bool = doc(True, "verl's use_remove_padding (packed sequences).")


def _version_tuple(version: str | None) -> tuple[int, int]:
    if not version:
        return (0, 9)
    parts = version.split(".")
    return int(parts[0]), int(parts[1])


def _deps(version: str | None) -> list[str]:
    v = _version_tuple(version)
    common = ["packaging", "hydra-core", "codetiming", "peft", "datasets", "torchdata", "pillow"]
    if v >= (0, 9):
        return [*common, "numpy>=2", "tensordict>=0.8,<=0.10.0,!=0.9.0", "transformers>=5.5.3,<5.11,!=5.6.0",
                "uvicorn", "fastapi"]
    if v >= (0, 7):
        return [*common, "numpy<2", "tensordict>=0.8,<=0.10.0,!=0.9.0", "transformers<5", "uvicorn", "fastapi",
                "einops", "pyarrow>=19,<22"]
    return [*common, "numpy<2", "tensordict>=0.8,<=0.9.1,!=0.9.0", "transformers<4.56", "einops", "pyarrow>=19,<22"]


class VerlAdapter(Adapter):
    name = "verl"
    capabilities = Capabilities(framework="verl", runs="(in progress)", readouts=("(in progress)",))

    @classmethod
    def requirements(cls, version: str | None) -> list[str]:
        return _deps(version)

    @classmethod
    def install_steps(cls, version: str | None) -> list[list[str]]:
        return [["--no-deps", f"verl=={version}" if version else "verl"]]

    @classmethod
    def unsupported(cls, spec: Spec) -> str | None:
        return "the verl adapter is being written"
