"""OpenRLHF's own SFT path (openrlhf.cli.train_sft) against the reference, at real releases.

OR-1, the "mean of means": up to 0.10.2 every micro-batch (and every rank) is normalised by its own supervised-token
count, so a micro-batch with n_k of the step's n tokens gets weight n / (K * n_k) instead of 1 (K = micro-batches
times ranks). 0.10.3 fixed the rank half (token count all-reduced per micro-step), 0.10.4 the accumulation half.
The expected weights below are computed from the spec's token counts, never from a version table.

The default suite uses `adam_impl = "torch"` (DeepSpeed's own torch_adam switch: no 1-4 min JIT of DeepSpeed's CPU
Adam per environment; gradients are read before the optimizer either way); the real FusedAdam/DeepSpeedCPUAdam
runs are in the slow tests and the bundled cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stepdiff.harness import data as D
from stepdiff.harness import spec as S
from stepdiff.harness.runner import run_case

pytestmark = pytest.mark.framework

ROOT = Path(__file__).resolve().parent.parent
BUGGY, HALF, FIXED = "openrlhf==0.10.2", "openrlhf==0.10.3", "openrlhf==0.11.2"
FAST = {"zero_stage": 2, "adam_impl": "torch"}


@pytest.fixture(scope="module")
def case() -> S.Spec:
    return S.load(ROOT / "cases" / "openrlhf-sft-mean-of-means.toml").replace(openrlhf=FAST)


def by_label(result):  # type: ignore[no-untyped-def]
    return {r.label: r for r in result.runs}


def mean_of_means(spec: S.Spec) -> list[float]:
    """n / (K * n_k) per (rank, micro-batch) from the spec's token counts."""
    counts = [c for rank in D.microbatch_token_counts(spec, 0) for c in rank]
    return [sum(counts) / (len(counts) * c) for c in counts]


def spec_targets(spec: S.Spec) -> dict[str, list[int]]:
    smp = D.samples(spec)
    used = sorted(i for r in range(spec.batch.world_size) for i in D.rank_indices(spec, r))
    return {str(i): [t + 1 for t, on in enumerate(D.supervised_targets(spec, smp[i])) if on] for i in used}


def assert_clean(run, spec: S.Spec) -> None:  # type: ignore[no-untyped-def]
    assert run.verdict == "agree", run.reason
    assert run.max_rel_grad_error < 1e-5
    k = spec.batch.grad_accum * spec.batch.world_size
    assert list(run.fit.weights) == pytest.approx([1.0] * k, abs=1e-4)
    assert run.signature.name == "correct"
    st = run.steps[0]
    assert st.loss_rel < 1e-5 and st.grad_norm_rel is not None and st.grad_norm_rel < 1e-5


def test_accumulation_half_caught_and_fix_clean(case: S.Spec, tmp_path: Path) -> None:
    """GA=2, one rank, micro-batches with 2 and 30 supervised tokens: 0.10.2 weighs them 8 and 0.53."""
    result = run_case(case, [BUGGY, FIXED], workdir=tmp_path)
    runs = by_label(result)
    bug, fixed = runs[BUGGY], runs[FIXED]
    assert result.verdict == "diverge" and result.exit_code == 1
    assert bug.verdict == "diverge"
    assert 1.5 < bug.max_rel_grad_error < 2.5  # measured 2.02
    expected = mean_of_means(case)
    assert expected == pytest.approx([8.0, 32 / 60])
    assert bug.fit.residual < 1e-5
    assert list(bug.fit.weights) == pytest.approx(expected, rel=1e-4)
    assert bug.signature.name == "microbatch-token-mean"
    assert bug.steps[0].grad_norm > 2 * bug.steps[0].grad_norm_ref  # OpenRLHF's logged grad norm shows it too
    assert_clean(fixed, case)
    for run in (bug, fixed):  # OpenRLHF's own loss mask: first response token .. EOS, exactly the spec's
        assert run.meta["extra"]["supervised_targets"] == spec_targets(case)
        assert run.meta["extra"]["cli_dialect"] == "dotted"
    assert bug.meta["framework_version"] == "0.10.2" and fixed.meta["framework_version"] == "0.11.2"


def test_rank_half_caught_and_fix_clean(case: S.Spec, tmp_path: Path) -> None:
    """GA=1, two ranks (torchrun + gloo), one micro-batch each with 2 and 30 tokens: each rank's own token mean."""
    spec = case.replace(batch__grad_accum=1, batch__world_size=2)
    result = run_case(spec, [BUGGY, FIXED], workdir=tmp_path)
    runs = by_label(result)
    bug, fixed = runs[BUGGY], runs[FIXED]
    assert bug.verdict == "diverge"
    assert 1.5 < bug.max_rel_grad_error < 2.5
    assert bug.fit.labels == ("rank 0 mb 0", "rank 1 mb 0")
    assert list(bug.fit.weights) == pytest.approx(mean_of_means(spec), rel=1e-4)
    # at GA=1 a per-micro-batch token mean is a per-rank token mean: the signature says the rank
    assert bug.signature.name == "rank-token-mean"
    assert_clean(fixed, spec)
    assert fixed.meta["world_size"] == 2
    assert fixed.meta["extra"]["supervised_targets"] == spec_targets(spec)  # gathered from both ranks


def test_offload_ga4_shows_both_bugs_separated(case: S.Spec, tmp_path: Path) -> None:
    """adam_offload + DeepSpeed 0.18.9 + GA=4 (the paper's pipeline): DeepSpeed drops micro-batches 1 and 2 (weight
    0), and the two survivors carry OpenRLHF's mean-of-means weights; 0.11.2 (DeepSpeed 0.19.6) agrees."""
    spec = S.load(ROOT / "cases" / "openrlhf-sft-offload-ga4.toml").replace(
        openrlhf={**FAST, "adam_offload": True})
    result = run_case(spec, [BUGGY, FIXED], workdir=tmp_path)
    runs = by_label(result)
    bug, fixed = runs[BUGGY], runs[FIXED]
    assert bug.verdict == "diverge"
    assert bug.max_rel_grad_error > 0.5  # measured 1.35
    mom = mean_of_means(spec)  # [5.875, 0.39, 3.92, 0.979] for token counts [2, 30, 3, 12]
    assert bug.fit.residual < 1e-5
    assert list(bug.fit.weights) == pytest.approx([mom[0], 0.0, 0.0, mom[3]], abs=1e-4)
    assert bug.signature.name == "dropped-microbatches+microbatch-token-mean"  # both bugs, named apart
    assert bug.meta["versions"]["deepspeed"] == "0.18.9"
    assert bug.meta["extra"]["ds_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert_clean(fixed, spec)


@pytest.mark.slow
def test_intermediate_release_fixes_only_the_rank_half(case: S.Spec, tmp_path: Path) -> None:
    """0.10.3: caught at GA=2 (each micro-step's mean), clean at GA=1 with two ranks."""
    ga = run_case(case, [HALF], workdir=tmp_path / "ga").runs[0]
    assert ga.verdict == "diverge"
    assert list(ga.fit.weights) == pytest.approx(mean_of_means(case), rel=1e-4)
    assert ga.signature.name in ("microbatch-token-mean", "microstep-token-mean")
    spec = case.replace(batch__grad_accum=1, batch__world_size=2)
    assert_clean(run_case(spec, [HALF], workdir=tmp_path / "ws").runs[0], spec)
    both = case.replace(batch__world_size=2)  # per micro-step token count across ranks: [4.7, 0.56, 4.7, 0.56]
    run = run_case(both, [HALF], workdir=tmp_path / "both").runs[0]
    counts = D.microbatch_token_counts(both, 0)
    n, per_step = sum(map(sum, counts)), [counts[0][m] + counts[1][m] for m in range(2)]
    assert list(run.fit.weights) == pytest.approx([n / (2 * per_step[m]) for _ in range(2) for m in range(2)], rel=1e-4)
    assert run.signature.name == "microstep-token-mean"


@pytest.mark.slow
def test_black_box_adam_delta_readout(case: S.Spec, tmp_path: Path) -> None:
    """No gradient hooks: the gradient from OpenRLHF's saved checkpoint through the AdamW update (lr = eps = 1e6)."""
    spec = case.replace(optimizer__lr=1e6, optimizer__eps=1e6, openrlhf={**FAST, "readout": "adam-delta"})
    runs = by_label(run_case(spec, [BUGGY, FIXED], workdir=tmp_path))
    assert runs[BUGGY].verdict == "diverge"
    assert list(runs[BUGGY].fit.weights) == pytest.approx(mean_of_means(spec), rel=1e-3)
    assert runs[FIXED].verdict == "agree", runs[FIXED].reason
    assert runs[FIXED].max_rel_grad_error < 1e-5


@pytest.mark.slow
def test_bf16_and_real_deepspeed_adam(case: S.Spec, tmp_path: Path) -> None:
    """OpenRLHF's default dtype (bf16) and its own optimizer (DeepSpeed FusedAdam, JIT-compiled on CPU)."""
    spec = case.replace(model__dtype="bfloat16", openrlhf={"zero_stage": 2})
    runs = by_label(run_case(spec, [BUGGY, FIXED], workdir=tmp_path))
    assert runs[BUGGY].verdict == "diverge" and runs[BUGGY].max_rel_grad_error > 1.0
    assert list(runs[BUGGY].fit.weights) == pytest.approx(mean_of_means(spec), rel=5e-2)
    assert runs[FIXED].verdict == "agree", runs[FIXED].reason


@pytest.mark.slow
def test_flat_cli_and_first_response_token_dropped(case: S.Spec, tmp_path: Path) -> None:
    """Flat CLI spelling (<= 0.10.1). OR-2: 0.6.2's labels and 0.7.0's loss mask start one token late (first
    response token never trained); 0.10.1's mask is the spec's and shows only the mean of means."""
    # these releases build their optimizer themselves: DeepSpeed's torch_adam switch cannot reach it (unsupported)
    case = case.replace(openrlhf={**FAST, "adam_impl": "deepspeed"})
    runs = by_label(run_case(case, ["openrlhf==0.6.2", "openrlhf==0.7.0", "openrlhf==0.10.1"], workdir=tmp_path))
    flat = runs["openrlhf==0.10.1"]
    want = spec_targets(case)
    for old in (runs["openrlhf==0.6.2"], runs["openrlhf==0.7.0"]):  # 0.6.2: labels built in the trainer
        assert old.verdict == "diverge" and "first response token not supervised" in old.reason
        assert old.meta["extra"]["supervised_targets"] == {k: v[1:] for k, v in want.items()}
        assert old.meta["extra"]["cli_dialect"] == "flat"
    assert flat.meta["extra"]["cli_dialect"] == "flat"
    assert flat.verdict == "diverge" and flat.meta["extra"]["supervised_targets"] == want
    assert list(flat.fit.weights) == pytest.approx(mean_of_means(case), rel=1e-4)


@pytest.mark.slow
def test_conformance_kit(tmp_path: Path) -> None:
    """The harness's conformance kit, with the AdamW optimizer OpenRLHF can build (its base spec uses SGD)."""
    from stepdiff.adapters.openrlhf.adapter import OpenRLHFAdapter
    from stepdiff.harness.conformance import base_spec, run_conformance
    from stepdiff.harness.runner import parse_pin

    pin = parse_pin(FIXED)
    raw = S.to_dict(base_spec(pin))
    raw["optimizer"] = {**raw["optimizer"], **OpenRLHFAdapter.conformance_optimizer}
    spec = S.from_dict(raw)
    checks = {c.name: c for c in run_conformance(pin, spec, workdir=tmp_path)}
    assert set(checks) == {"unsupported", "init", "order", "pre-clip", "repeat", "zero-lr"}
    failed = {n: c.detail for n, c in checks.items() if c.passed is False}
    assert not failed, failed


def test_unsupported_specs_are_reported(case: S.Spec) -> None:
    from stepdiff.adapters.openrlhf.adapter import OpenRLHFAdapter as A

    assert A.unsupported(case) is None
    assert "sgd" in A.unsupported(case.replace(optimizer__name="sgd"))
    assert "weight_decay" in A.unsupported(case.replace(optimizer__weight_decay=0.01))
    # weight decay runs when the spec excludes exactly what OpenRLHF's get_optimizer_grouped_parameters excludes
    grouped = case.replace(optimizer__weight_decay=0.01, optimizer__no_decay=["bias", "norm.weight"])
    assert A.unsupported(grouped) is None
    assert "EOS" in A.unsupported(case.replace(data__samples=[{"prompt": [5, 6], "response": [7, 8]}] * 4))
    assert "supervise" in A.unsupported(case.replace(data__supervise="all"))
    bb = case.replace(openrlhf={"readout": "adam-delta"})
    assert A.unsupported(bb) is None
    assert "betas" in A.unsupported(bb.replace(batch__steps=2))
    assert "offload" in A.unsupported(case.replace(openrlhf={"zero_stage": 0, "adam_offload": True}))
