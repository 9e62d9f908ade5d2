"""Shared fixtures: small specs and in-process reference runs (the host has torch and transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stepdiff.harness import spec as S

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_spec() -> S.Spec:
    return S.from_dict({"case": {"name": "tiny"}, "batch": {"grad_accum": 2}})


def run_reference(spec: S.Spec, tmp_path: Path, dtype: str | None = None) -> Any:
    """The reference adapter in this process (no worker): for unit tests of its math."""
    from stepdiff.adapters.base import WorkerContext
    from stepdiff.adapters.reference import ReferenceAdapter
    from stepdiff.harness.model import write_init_weights

    init = write_init_weights(spec, tmp_path / "init")
    ctx = WorkerContext(rank=0, world_size=1, local_rank=0, device="cpu", scratch=tmp_path)
    return ReferenceAdapter().run(spec, init, ctx, dtype=dtype), init
