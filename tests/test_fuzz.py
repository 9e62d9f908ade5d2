"""Hypothesis fuzzing finds the DeepSpeed offload bug from a configuration where it is present and shrinks it to the
smallest configuration where it can act (3 micro-batches of one sample), and finds nothing on the fixed release."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepdiff.harness import spec as S
from stepdiff.harness.cli import resolve_case
from stepdiff.harness.fuzz import fuzz
from stepdiff.harness.runner import parse_pin

pytestmark = pytest.mark.framework


def test_fuzz_finds_and_shrinks_the_offload_bug(tmp_path: Path) -> None:
    base = S.load(resolve_case("deepspeed-zero2-offload-ga4"))
    found = fuzz(base, parse_pin("deepspeed==0.18.9"), examples=10, workdir=tmp_path / "bug")
    assert found.failing is not None and found.result is not None
    assert found.failing["batch__grad_accum"] == 3  # GA <= 2 cannot show it; 3 is the minimum
    assert found.failing["batch__micro_batch_size"] == 1
    assert found.result.signature is not None and found.result.signature.name == "dropped-microbatches"
    assert list(found.result.fit.weights) == pytest.approx([1, 0, 1], abs=1e-4)
    clean = fuzz(base, parse_pin("deepspeed==0.19.8"), examples=4, workdir=tmp_path / "fixed")
    assert clean.failing is None and clean.examples == 4
    assert all(verdict == "agree" for _, verdict in clean.tried)
