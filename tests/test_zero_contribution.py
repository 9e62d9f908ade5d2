"""Fits that say what they cannot know: a contribution with (near-)zero norm has no identifiable weight. It is marked
undetermined and left out of pattern naming, so an agreeing run never reads "mb 0 got weight 0 (dropped)" and a
uniform scale stays `uniform-scale`. End to end on GRPO (TRL-1): micro-batches whose completions are all masked or
whose advantages are all 0 — the fixed release agrees with signature `correct`, the buggy one is `uniform-scale`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from stepdiff.harness import spec as S
from stepdiff.harness.cli import resolve_case
from stepdiff.harness.compare import fit_microbatches
from stepdiff.harness.signatures import describe, fit_weights

from .conftest import run_reference

CASE = "trl-grpo-zero-contribution"
BUGGY, FIXED = "trl==1.8.0", "trl==1.9.0"


def contribs(n: int, zero: set[int]) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"a": torch.zeros(5, 3) if i in zero else torch.randn(5, 3, generator=g),
             "b": torch.zeros(4) if i in zero else torch.randn(4, generator=g)} for i in range(n)]


def combine(cs: list[dict[str, torch.Tensor]], w: list[float]) -> dict[str, torch.Tensor]:
    return {k: sum(x * c[k] for x, c in zip(w, cs, strict=True)) for k in cs[0]}  # type: ignore[misc]


def test_zero_contribution_is_undetermined_not_dropped() -> None:
    cs = contribs(3, {1})
    fit = fit_weights(combine(cs, [1, 1, 1]), cs)
    assert fit.undetermined == (1,) and math.isnan(fit.weights[1])
    assert fit.weights[0] == pytest.approx(1) and fit.weights[2] == pytest.approx(1)
    sig = describe(fit, [[3, 4, 5]])
    assert sig.name == "correct" and "dropped" not in sig.text and "mb 1: no gradient contribution" in sig.text
    # the sibling that must still say "diverge"-shaped things: a real drop among the determined ones is named
    fit = fit_weights(combine(cs, [1, 1, 0]), cs)
    assert describe(fit, [[3, 4, 5]]).name == "dropped-microbatches"
    # a uniform scale stays a uniform scale (it used to read as `reweighted`: [0.3, 0, 0.3])
    fit = fit_weights(combine(cs, [0.3, 1, 0.3]), cs)
    assert describe(fit, [[3, 4, 5]]).name == "uniform-scale"


def test_near_zero_counts_as_zero_and_everything_zero_is_undetermined() -> None:
    cs = contribs(2, set())
    cs[1] = {k: v * 1e-9 for k, v in cs[1].items()}
    assert fit_weights(combine(cs, [1, 1]), cs).undetermined == (1,)
    nothing = contribs(2, {0, 1})
    fit = fit_weights({k: torch.zeros_like(v) for k, v in nothing[0].items()}, nothing)
    assert fit.undetermined == (0, 1) and describe(fit, [[1, 1]]).name == "undetermined"


def test_reference_contributions_of_the_case_are_exactly_zero(tmp_path: Path) -> None:
    spec = S.load(resolve_case(CASE))
    ref, _ = run_reference(spec, tmp_path)
    for step in range(spec.batch.steps):
        zero = [v for k, v in ref.extras.items() if k.startswith(f"contrib/{step}/0/0/")]
        live = [v for k, v in ref.extras.items() if k.startswith(f"contrib/{step}/0/1/")]
        assert zero and all(not bool(v.any()) for v in zero)
        assert any(bool(v.any()) for v in live)
        fit, sig = fit_microbatches(spec, ref.steps[step].grads, ref, step)
        assert fit.undetermined == (0,) and sig.name == "correct"


@pytest.mark.framework
def test_grpo_zero_contribution_fixed_is_correct_buggy_is_uniform_scale(tmp_path: Path) -> None:
    from stepdiff.harness import data as D
    from stepdiff.harness.runner import run_case

    spec = S.load(resolve_case(CASE))
    result = run_case(spec, [BUGGY, FIXED], workdir=tmp_path)
    runs = {r.label: r for r in result.runs}
    bug, fixed = runs[BUGGY], runs[FIXED]
    assert fixed.verdict == "agree", fixed.reason
    assert fixed.max_rel_grad_error is not None and fixed.max_rel_grad_error < 1e-5
    assert fixed.signature is not None and fixed.signature.name == "correct", fixed.signature
    assert "dropped" not in fixed.signature.text
    assert fixed.fit is not None and fixed.fit.undetermined == (0,) and fixed.fit.weights[1] == pytest.approx(1, 1e-4)
    smp = D.samples(spec)
    step0 = [i for m in range(spec.batch.grad_accum) for i in D.micro_batch_indices(spec, 0, 0, m)]
    kept = sum(len(smp[i].response) for i in step0 if not smp[i].truncated)
    every = sum(len(smp[i].response) for i in step0)
    assert bug.verdict == "diverge" and bug.first_diverging_step == 0
    assert bug.fit is not None and bug.fit.undetermined == (0,) and bug.fit.residual < 1e-5
    assert bug.fit.weights[1] == pytest.approx(kept / every, rel=1e-4)  # 5/17
    assert bug.signature is not None and bug.signature.name == "uniform-scale", bug.signature
    assert result.exit_code == 1
