"""TRL's own trainers (SFTTrainer, DPOTrainer, GRPOTrainer) against the reference, at real releases.

Negative controls, each caught with its shape and its fixed release clean (verdicts from the numbers only):
- HF-1: transformers 4.45.2 + trl 0.11.4 normalise each accumulated micro-batch by its own token count
  (mean of means) -> weights N / (GA * n_m), signature microbatch-token-mean; transformers 4.46.3 + trl 0.12.2 agree;
- DS-1 through TRL: trl 1.16.0 + deepspeed 0.18.9 (ZeRO-2, offload_optimizer cpu, GA=3) drop the middle micro-batch
  -> weights [1, 0, 1], signature dropped-microbatches; + deepspeed 0.19.8 agrees;
- TRL-1: trl 1.8.0 GRPO dapo counts truncated completions in the normaliser -> every micro-batch weighted
  kept/all tokens, signature uniform-scale; trl 1.9.0 agrees.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stepdiff.harness import data as D
from stepdiff.harness import spec as S
from stepdiff.harness.cli import resolve_case
from stepdiff.harness.runner import run_case

pytestmark = pytest.mark.framework

HF1_BUGGY, HF1_FIXED = "trl==0.11.4,transformers==4.45.2", "trl==0.12.2,transformers==4.46.3"
DS_BUGGY, DS_FIXED = "trl==1.16.0,deepspeed==0.18.9", "trl==1.16.0,deepspeed==0.19.8"
GRPO_BUGGY, GRPO_FIXED = "trl==1.8.0", "trl==1.9.0"
CURRENT = "trl==1.16.0"


def case(name: str) -> S.Spec:
    return S.load(resolve_case(name))


def by_label(result):  # type: ignore[no-untyped-def]
    return {r.label: r for r in result.runs}


def assert_clean(run, n_weights: int) -> None:  # type: ignore[no-untyped-def]
    assert run.verdict == "agree", run.reason
    assert run.max_rel_grad_error < 1e-5
    assert run.fit is not None and list(run.fit.weights) == pytest.approx([1.0] * n_weights, abs=1e-4)
    assert run.signature is not None and run.signature.name == "correct"
    for st in run.steps:
        assert st.loss_rel is not None and st.loss_rel < 1e-5
        assert st.grad_norm_rel is not None and st.grad_norm_rel < 1e-5


def test_sft_gradient_accumulation_mean_of_means_caught_and_fix_clean(tmp_path: Path) -> None:
    spec = case("trl-sft-ga3")  # GA=3, 2 steps, completion-only loss, micro-batches of very different token counts
    result = run_case(spec, [HF1_BUGGY, HF1_FIXED], workdir=tmp_path)
    runs = by_label(result)
    bug, fixed = runs[HF1_BUGGY], runs[HF1_FIXED]
    assert result.verdict == "diverge" and result.exit_code == 1
    counts = D.microbatch_token_counts(spec, 0)[0]
    predicted = [sum(counts) / (len(counts) * n) for n in counts]  # per-micro-batch token mean / GA
    assert bug.verdict == "diverge" and bug.first_diverging_step == 0
    assert 0.5 < bug.max_rel_grad_error < 5
    assert bug.fit is not None and bug.fit.residual < 1e-5
    assert list(bug.fit.weights) == pytest.approx(predicted, rel=1e-3)
    assert bug.signature is not None and bug.signature.name == "microbatch-token-mean"
    assert_clean(fixed, 3)
    assert bug.meta and bug.meta["versions"]["transformers"] == "4.45.2"
    assert fixed.meta and fixed.meta["versions"]["transformers"] == "4.46.3"
    # the supervised targets TRL trained are exactly the spec's completion tokens
    smp = D.samples(spec)
    targets = fixed.meta["extra"]["supervised_targets"]
    for i, pos in targets.items():
        want = [t for t, s in enumerate(D.supervised_targets(spec, smp[int(i)]), start=1) if s]
        assert pos == want


@pytest.mark.slow  # agree-only; its diverge sibling at world size 2 (per-rank token mean) is in the default suite
def test_sft_world_size_2_adamw_clipping_current_release(tmp_path: Path) -> None:
    """trl 1.16.0 at world size 2 (torchrun, gloo, both processes really used), AdamW, clipping on, 2 steps."""
    spec = case("trl-sft-ga3").replace(batch__world_size=2, batch__grad_accum=2, optimizer__name="adamw",
                                       optimizer__lr=1e-3, optimizer__clip_grad_norm=0.5)
    result = run_case(spec, [CURRENT], workdir=tmp_path)
    run = result.runs[0]
    assert_clean(run, 4)
    assert all(st.update.total.rel < 1e-3 for st in run.steps)  # the clipped AdamW update, step after step
    assert run.steps[0].grad_norm_ref > 0.5  # clipping really acted, the recorded gradient is the unclipped one
    extra = run.meta["extra"]
    assert extra["accelerate_num_processes"] == 2 and "MULTI_CPU" in extra["accelerate_distributed_type"]
    assert run.meta["world_size"] == 2


def test_deepspeed_offload_bug_reaches_trl_and_fix_clean(tmp_path: Path) -> None:
    spec = case("trl-deepspeed-zero2-offload-ga3")
    result = run_case(spec, [DS_BUGGY, DS_FIXED], workdir=tmp_path)
    runs = by_label(result)
    bug, fixed = runs[DS_BUGGY], runs[DS_FIXED]
    assert result.verdict == "diverge"
    assert bug.verdict == "diverge" and bug.max_rel_grad_error > 0.1
    assert bug.fit is not None and bug.fit.residual < 1e-5
    assert list(bug.fit.weights) == pytest.approx([1, 0, 1], abs=1e-4)
    assert bug.signature is not None and bug.signature.name == "dropped-microbatches"
    assert bug.steps[0].loss_rel < 1e-5  # TRL's logged loss stays correct: only gradient and grad norm show it
    assert bug.steps[0].grad_norm < bug.steps[0].grad_norm_ref
    assert_clean(fixed, 3)
    assert bug.meta["versions"]["deepspeed"] == "0.18.9" and fixed.meta["versions"]["deepspeed"] == "0.19.8"
    assert "DeepSpeedEngine.step" in bug.meta["readout"]


def test_dpo_through_dpotrainer_agrees(tmp_path: Path) -> None:
    result = run_case(case("trl-dpo"), [CURRENT], workdir=tmp_path)
    run = result.runs[0]
    assert_clean(run, 3)
    assert run.steps[0].loss == pytest.approx(0.693147, abs=1e-6)  # ln 2: policy = reference policy at step 0
    assert "DPOTrainer" in run.meta["code_path"]


def test_grpo_dapo_truncated_normaliser_caught_and_fix_clean(tmp_path: Path) -> None:
    spec = case("trl-grpo-dapo-truncated")
    result = run_case(spec, [GRPO_BUGGY, GRPO_FIXED], workdir=tmp_path)
    runs = by_label(result)
    bug, fixed = runs[GRPO_BUGGY], runs[GRPO_FIXED]
    smp = D.samples(spec)
    step0 = [i for m in range(spec.batch.grad_accum) for i in D.micro_batch_indices(spec, 0, 0, m)]
    kept = sum(len(smp[i].response) for i in step0 if not smp[i].truncated)
    every = sum(len(smp[i].response) for i in step0)
    assert bug.verdict == "diverge" and bug.max_rel_grad_error > 0.1
    assert bug.fit is not None and bug.fit.residual < 1e-5
    assert list(bug.fit.weights) == pytest.approx([kept / every] * 2, rel=1e-4)  # 5/17
    assert bug.signature is not None and bug.signature.name == "uniform-scale"
    assert_clean(fixed, 2)
    adv = fixed.meta["extra"]["advantages_max_abs_error_vs_spec"]
    assert adv is not None and adv < 1e-5  # TRL's group-normalised advantages are the spec's


def test_unsupported_knobs_are_reported_not_approximated() -> None:
    from stepdiff.adapters.trl.adapter import TRLAdapter

    sft = case("trl-sft-ga3")
    assert TRLAdapter.unsupported(sft) is None
    assert "weight_decay" in TRLAdapter.unsupported(sft.replace(optimizer__weight_decay=0.1))
    assert "token mean" in TRLAdapter.unsupported(sft.replace(loss__aggregation="seq-mean-token-mean"))
    assert "stage" in TRLAdapter.unsupported(sft.replace(trl={"deepspeed_zero_stage": 3}))
    grpo = case("trl-grpo-dapo-truncated")
    assert TRLAdapter.unsupported(grpo) is None
    assert "bnpo" in TRLAdapter.unsupported(grpo.replace(trl={"grpo_loss_type": "bnpo"}))
    assert "aggregates" in TRLAdapter.unsupported(grpo.replace(trl={"grpo_loss_type": "grpo"}))
    assert "given" in TRLAdapter.unsupported(grpo.replace(rl__advantage="given"))
    assert "1e-4" in TRLAdapter.unsupported(grpo.replace(rl__advantage_eps=1e-6))
    assert TRLAdapter.unsupported(sft.replace(loss__kind="value")) is not None


@pytest.mark.slow
@pytest.mark.parametrize(("aggregation", "ws", "ga"), [("seq-mean-token-mean", 1, 2),
                                                       ("seq-mean-token-sum-norm", 1, 2), ("token-mean", 2, 1)],
                         ids=["grpo", "dr_grpo", "dapo-ws2"])
def test_grpo_loss_types_agree(tmp_path: Path, aggregation: str, ws: int, ga: int) -> None:
    spec = case("trl-grpo-dapo-truncated").replace(loss__aggregation=aggregation, trl={"grpo_loss_type": "auto"},
                                                   batch__world_size=ws, batch__grad_accum=ga)
    result = run_case(spec, [GRPO_FIXED], workdir=tmp_path)
    assert_clean(result.runs[0], ws * ga)


def test_sft_world_size_2_per_rank_token_mean_caught(tmp_path: Path) -> None:
    """HF-4: transformers 4.46.3 fixed the accumulation (HF-1) but normalises each rank by its own tokens
    (average_tokens_across_devices did not exist / defaulted off before 4.54): at world size 2 it is a mean over ranks
    of per-rank token means. trl 1.16.0 at world size 2 agrees (test_sft_world_size_2_adamw_clipping_...)."""
    spec = case("trl-sft-ga3").replace(batch__world_size=2, batch__steps=1)
    result = run_case(spec, [HF1_FIXED], workdir=tmp_path)
    run = result.runs[0]
    counts = D.microbatch_token_counts(spec, 0)
    total = sum(map(sum, counts))
    predicted = [total / (len(counts) * sum(rank)) for rank in counts for _ in rank]
    assert run.verdict == "diverge" and run.max_rel_grad_error > 0.05
    assert run.fit is not None and run.fit.residual < 1e-5
    assert list(run.fit.weights) == pytest.approx(predicted, rel=1e-3)
    assert run.signature is not None and run.signature.name == "rank-token-mean"
    assert run.meta["extra"]["accelerate_num_processes"] == 2


@pytest.mark.slow
def test_sft_supervise_all_position_zero_counted(tmp_path: Path) -> None:
    """HF-2: with every token supervised, transformers 4.46.3 counts the position-0 label (never a target after the
    causal shift) in num_items_in_batch: the whole gradient is scaled by N / (N + rows). trl 1.16.0 agrees."""
    spec = case("trl-sft-ga3").replace(data__supervise="all", batch__steps=1)
    result = run_case(spec, [HF1_FIXED, CURRENT], workdir=tmp_path)
    runs = by_label(result)
    bug = runs[HF1_FIXED]
    n = sum(D.microbatch_token_counts(spec, 0)[0])
    rows = spec.samples_per_step
    assert bug.verdict == "diverge" and bug.signature.name == "uniform-scale"
    assert list(bug.fit.weights) == pytest.approx([n / (n + rows)] * 3, rel=1e-4)
    assert_clean(runs[CURRENT], 3)


@pytest.mark.slow
def test_deepspeed_through_trl_world_size_2(tmp_path: Path) -> None:
    spec = case("trl-deepspeed-zero2-offload-ga3").replace(batch__world_size=2)
    result = run_case(spec, [DS_BUGGY, DS_FIXED], workdir=tmp_path)
    runs = by_label(result)
    assert list(runs[DS_BUGGY].fit.weights) == pytest.approx([1, 0, 1, 1, 0, 1], abs=1e-4)
    assert runs[DS_BUGGY].signature.name == "dropped-microbatches"
    assert_clean(runs[DS_FIXED], 6)


@pytest.mark.slow
def test_dpo_world_size_2(tmp_path: Path) -> None:
    spec = case("trl-dpo").replace(batch__world_size=2, batch__steps=1)
    result = run_case(spec, [CURRENT], workdir=tmp_path)
    assert_clean(result.runs[0], 6)
    assert result.runs[0].meta["extra"]["accelerate_num_processes"] == 2


@pytest.mark.slow
def test_conformance_kit() -> None:
    from stepdiff.harness.conformance import run_conformance
    from stepdiff.harness.runner import parse_pin

    for pin in (CURRENT, HF1_FIXED):
        checks = run_conformance(parse_pin(pin))
        failed = [f"{c.name}: {c.detail}" for c in checks if c.passed is False]
        assert not failed, f"{pin}: {failed}"
