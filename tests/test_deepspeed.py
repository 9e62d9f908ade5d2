"""DeepSpeed through its own engine against the reference, at real releases.

The ZeRO-2 + CPU-offload gradient-accumulation bug (0.15.2-0.18.9, fixed in 0.19.0) must be caught with its shape
(the middle micro-batches get weight 0) wherever it can act, 0.19.8 must agree everywhere, and 0.18.9 must agree
where the bug cannot act (GA=2, offload off): the tester must not false-alarm.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stepdiff.harness import spec as S
from stepdiff.harness.cli import resolve_case
from stepdiff.harness.runner import run_case

pytestmark = pytest.mark.framework

BUGGY, FIXED = "deepspeed==0.18.9", "deepspeed==0.19.8"


@pytest.fixture(scope="module")
def case() -> S.Spec:
    return S.load(resolve_case("deepspeed-zero2-offload-ga4"))


def by_label(result):  # type: ignore[no-untyped-def]
    return {r.label: r for r in result.runs}


@pytest.mark.parametrize(
    ("ga", "ws", "weights"),
    [
        (4, 1, [1, 0, 0, 1]),
        (3, 1, [1, 0, 1]),
        # world size 2: the same fault per rank (slow: the suite's 20-minute budget; ws2 DeepSpeed stays in the
        # default suite through test_deepspeed_whole_step's BF16_Optimizer control)
        pytest.param(4, 2, [1, 0, 0, 1, 1, 0, 0, 1], marks=pytest.mark.slow),
    ],
)
def test_offload_bug_caught_and_fix_clean(case: S.Spec, tmp_path: Path, ga: int, ws: int, weights: list[int]) -> None:
    spec = case.replace(batch__grad_accum=ga, batch__world_size=ws)
    result = run_case(spec, [BUGGY, FIXED], workdir=tmp_path)
    runs = by_label(result)
    bug, fixed = runs[BUGGY], runs[FIXED]
    assert result.verdict == "diverge" and result.exit_code == 1
    assert bug.verdict == "diverge"
    assert bug.max_rel_grad_error > 0.1  # bugs are decades above the bound, not at its edge
    assert bug.fit is not None and bug.fit.residual < 1e-5
    assert list(bug.fit.weights) == pytest.approx(weights, abs=1e-4)
    assert bug.signature is not None and bug.signature.name == "dropped-microbatches"
    assert bug.steps[0].grad_norm < bug.steps[0].grad_norm_ref  # the engine's own norm shows the loss too
    assert fixed.verdict == "agree"
    assert fixed.max_rel_grad_error < 1e-5
    assert list(fixed.fit.weights) == pytest.approx([1.0] * len(weights), abs=1e-4)
    assert fixed.meta and fixed.meta["extra"]["readout_crosscheck_max_abs"] < 1e-6  # sgfg == SGD delta / lr
    assert bug.meta and bug.meta["framework_version"] == "0.18.9" and fixed.meta["framework_version"] == "0.19.8"


@pytest.mark.parametrize("change", [{"batch__grad_accum": 2}, {"batch__grad_accum": 4, "deepspeed": {"zero_stage": 2}}],
                         ids=["ga2", "offload-off"])
def test_no_false_alarm_where_the_bug_cannot_act(case: S.Spec, tmp_path: Path, change: dict) -> None:
    spec = case.replace(**change)
    result = run_case(spec, [BUGGY], workdir=tmp_path)
    run = result.runs[0]
    assert run.verdict == "agree", run.reason
    assert run.max_rel_grad_error < 1e-5
    assert result.exit_code == 0


@pytest.mark.slow  # the default suite has 3 AdamW steps with clipping in test_deepspeed_whole_step (fixed release)
def test_several_steps_with_adamw_and_clipping(case: S.Spec, tmp_path: Path) -> None:
    """AdamW, clipping on, 3 steps: the fixed release tracks the reference step after step."""
    spec = case.replace(optimizer__name="adamw", optimizer__lr=1e-3, optimizer__clip_grad_norm=0.5, batch__steps=3)
    result = run_case(spec, [FIXED, BUGGY], workdir=tmp_path)
    runs = by_label(result)
    assert runs[FIXED].verdict == "agree"
    assert all(s.update.total.rel < 1e-3 for s in runs[FIXED].steps)
    assert runs[BUGGY].verdict == "diverge" and runs[BUGGY].first_diverging_step == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "knobs",
    [{"zero_stage": 0}, {"zero_stage": 1, "offload_optimizer": "cpu"}, {"zero_stage": 3},
     {"zero_stage": 3, "offload_optimizer": "cpu"}],
    ids=["stage0", "stage1-offload", "stage3", "stage3-offload"],
)
def test_other_stages_agree_on_both_releases(case: S.Spec, tmp_path: Path, knobs: dict) -> None:
    """Stage 1 reduces only at the boundary, so the offload accumulation bug cannot act there (nor at 0 or 3)."""
    result = run_case(case.replace(deepspeed=knobs), [BUGGY, FIXED], workdir=tmp_path)
    assert [r.verdict for r in result.runs] == ["agree", "agree"], [r.reason for r in result.runs]
    assert all(r.max_rel_grad_error < 1e-5 for r in result.runs)


@pytest.mark.slow
def test_bf16_and_overlap_comm(case: S.Spec, tmp_path: Path) -> None:
    """bf16 gets its own calibrated bound; the bug (16x above it) is still caught, the fix still agrees."""
    result = run_case(case.replace(model__dtype="bfloat16", deepspeed={"zero_stage": 2, "offload_optimizer": "cpu",
                                                                        "overlap_comm": True}),
                      [BUGGY, FIXED], workdir=tmp_path)
    runs = by_label(result)
    assert result.bound.value >= 1e-2
    assert runs[BUGGY].verdict == "diverge" and list(runs[BUGGY].fit.weights) == pytest.approx([1, 0, 0, 1], abs=0.02)
    assert runs[FIXED].verdict == "agree" and runs[FIXED].max_rel_grad_error < result.bound.value / 5
