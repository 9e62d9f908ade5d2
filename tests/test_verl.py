"""verl adapter: verl's own SFT, PPO-actor and critic code paths against the reference, with real-release negative
controls (VE-1 legacy actor mean of micro-batch means, VE-2 engine critic sum of micro-batch means, VE-3 legacy SFT
trainer sum of micro-batch means, the 0.7.1 engine's padded-response attention mask without remove-padding).

Every verdict comes from the numbers: the fitted micro-batch weights are checked against the patterns the token
counts predict, and every buggy release's fixed release must come out clean. The default suite needs three verl
environments (0.5.0, 0.7.1, 0.9.1); 0.6.1, 0.8.0, world size 2, FSDP1 and the other aggregations are `slow`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stepdiff.harness import data as D
from stepdiff.harness import spec as S
from stepdiff.harness.runner import run_case
from stepdiff.harness.signatures import candidate_patterns

CASES = Path(__file__).resolve().parents[1] / "cases"
pytestmark = pytest.mark.framework


def _spec(case: str, **knobs: object) -> S.Spec:
    sp = S.load(CASES / f"{case}.toml")
    if knobs:
        sp = sp.replace(knobs={"verl": {**S.to_dict(sp)["knobs"]["verl"], **knobs}})
    return sp


def _runs(result: object) -> dict[str, object]:
    return {r.version: r for r in result.runs}  # type: ignore[attr-defined]


def _pattern(spec: S.Spec, name: str) -> list[float]:
    return candidate_patterns(D.microbatch_token_counts(spec, 0))[name][0]


def _assert_weights(run: object, expected: list[float], tol: float = 1e-4) -> None:
    w = run.fit.weights  # type: ignore[attr-defined]
    assert len(w) == len(expected)
    for got, want in zip(w, expected, strict=True):
        assert abs(got - want) <= tol * max(1.0, abs(want)), (w, expected)
    assert run.fit.residual < 1e-5  # type: ignore[attr-defined]


def _assert_clean(run: object) -> None:
    assert run.verdict == "agree", run.reason  # type: ignore[attr-defined]
    assert run.max_rel_grad_error < 2e-6  # type: ignore[attr-defined]
    assert run.signature.name == "correct"  # type: ignore[attr-defined]


def _lopsided(spec: S.Spec) -> None:
    """The negative controls need micro-batches with different token counts (else every aggregation agrees)."""
    counts = [c for r in D.microbatch_token_counts(spec, 0) for c in r]
    assert max(counts) >= 2 * min(counts), counts


def test_capabilities_and_unsupported() -> None:
    from stepdiff.adapters.verl.adapter import VerlAdapter

    caps = VerlAdapter.capabilities
    assert {"sft", "policy", "value"} <= set(caps.loss_kinds)
    assert len(caps.patches) >= 9 and all(p.why for p in caps.patches)
    assert VerlAdapter.unsupported(_spec("verl-sft")) is None
    assert "policy" in VerlAdapter.unsupported(_spec("verl-sft", path="actor"))
    assert "fsdp1" in VerlAdapter.unsupported(_spec("verl-actor", strategy="fsdp1").replace(batch__world_size=2))
    assert "supervise" in VerlAdapter.unsupported(_spec("verl-actor").replace(data__supervise="all"))
    assert VerlAdapter.install_steps("0.7.1") == [["--no-deps", "verl==0.7.1"]]
    assert "numpy<2" in VerlAdapter.requirements("0.5.0") and "numpy>=2" in VerlAdapter.requirements("0.9.1")


def test_sft_ve3_legacy_trainer_caught_engine_clean() -> None:
    spec = _spec("verl-sft")
    _lopsided(spec)
    runs = _runs(run_case(spec, ["verl==0.5.0", "verl==0.9.1"]))
    bug, ok = runs["0.5.0"], runs["0.9.1"]
    assert "fsdp_sft_trainer" in bug.meta["code_path"] and "sft_loss" in ok.meta["code_path"]
    assert bug.verdict == "diverge"
    assert bug.signature.name == "microbatch-token-mean-summed"
    _assert_weights(bug, _pattern(spec, "microbatch-token-mean-summed"))
    assert 0.5 < bug.max_rel_grad_error < 5
    _assert_clean(ok)
    _assert_weights(ok, [1.0, 1.0])


def test_actor_ve1_legacy_mean_of_means_engine_clean() -> None:
    spec = _spec("verl-actor")
    _lopsided(spec)
    runs = _runs(run_case(spec, ["verl==0.7.1", "verl==0.9.1"]))
    bug, ok = runs["0.7.1"], runs["0.9.1"]
    assert "dp_actor.DataParallelPPOActor.update_policy" in bug.meta["code_path"]
    assert "ppo_loss" in ok.meta["code_path"]
    assert bug.verdict == "diverge"
    assert bug.signature.name == "microbatch-token-mean"
    _assert_weights(bug, _pattern(spec, "microbatch-token-mean"))
    assert 0.1 < bug.max_rel_grad_error < 3
    _assert_clean(ok)


def test_engine_actor_071_without_remove_padding_is_unexplained() -> None:
    bug = run_case(_spec("verl-actor-no-rmpad"), ["verl==0.7.1"]).runs[0]
    assert bug.verdict == "diverge"
    assert bug.signature.name == "unexplained"
    assert 0.01 < bug.fit.residual < 0.3
    assert 0.01 < bug.max_rel_grad_error < 0.3
    ok = run_case(_spec("verl-actor-no-rmpad", use_remove_padding=True), ["verl==0.7.1"]).runs[0]
    assert "use_remove_padding=True" in ok.meta["code_path"]
    _assert_clean(ok)


def test_critic_ve2_engine_sums_microbatch_means_fixed_in_09() -> None:
    spec = _spec("verl-critic")
    _lopsided(spec)
    runs = _runs(run_case(spec, ["verl==0.7.1", "verl==0.9.1"]))
    bug, ok = runs["0.7.1"], runs["0.9.1"]
    assert "value_loss" in bug.meta["code_path"] and "value_loss" in ok.meta["code_path"]
    assert bug.verdict == "diverge"
    assert bug.signature.name == "microbatch-token-mean-summed"
    _assert_weights(bug, _pattern(spec, "microbatch-token-mean-summed"))
    assert bug.steps[0].grad_norm > 1.5 * bug.steps[0].grad_norm_ref
    _assert_clean(ok)


# --------------------------------------------------------------------------------------------------------------------
# slow: more releases, world size 2, FSDP1, other aggregations


@pytest.mark.slow
def test_critic_ve2_080_vs_091() -> None:
    spec = _spec("verl-critic")
    runs = _runs(run_case(spec, ["verl==0.8.0", "verl==0.9.1"]))
    assert runs["0.8.0"].signature.name == "microbatch-token-mean-summed"
    _assert_weights(runs["0.8.0"], _pattern(spec, "microbatch-token-mean-summed"))
    _assert_clean(runs["0.9.1"])


@pytest.mark.slow
def test_sft_three_way_050_061_engine() -> None:
    spec = _spec("verl-sft")
    runs = _runs(run_case(spec, ["verl==0.5.0", "verl==0.6.1", "verl==0.9.1"]))
    assert runs["0.5.0"].signature.name == "microbatch-token-mean-summed"
    assert runs["0.6.1"].signature.name == "microbatch-token-mean"
    _assert_weights(runs["0.6.1"], _pattern(spec, "microbatch-token-mean"))
    _assert_clean(runs["0.9.1"])


@pytest.mark.slow
def test_engine_actor_every_release_with_remove_padding() -> None:
    runs = _runs(run_case(_spec("verl-actor-engine"), ["verl==0.7.1", "verl==0.8.0", "verl==0.9.1"]))
    for r in runs.values():
        _assert_clean(r)


@pytest.mark.slow
def test_world_size_2_fsdp2() -> None:
    actor = _spec("verl-actor").replace(batch__world_size=2, batch__grad_accum=1)
    runs = _runs(run_case(actor, ["verl==0.7.1", "verl==0.9.1"]))
    assert runs["0.7.1"].verdict == "diverge"
    _assert_weights(runs["0.7.1"], _pattern(actor, "rank-token-mean"))
    _assert_clean(runs["0.9.1"])
    sft = _spec("verl-sft").replace(batch__world_size=2, batch__grad_accum=2)
    runs = _runs(run_case(sft, ["verl==0.5.0", "verl==0.9.1"]))
    counts = D.microbatch_token_counts(sft, 0)
    n = sum(map(sum, counts))
    # 0.5.0: each micro-batch's own mean, summed over accumulation, averaged over the two ranks
    _assert_weights(runs["0.5.0"], [n / (2 * c) for r in counts for c in r])
    _assert_clean(runs["0.9.1"])


@pytest.mark.slow
def test_fsdp1_world_size_1() -> None:
    sft = _spec("verl-sft", strategy="fsdp1")
    runs = _runs(run_case(sft, ["verl==0.5.0", "verl==0.9.1"]))
    assert runs["0.5.0"].signature.name == "microbatch-token-mean-summed"
    _assert_clean(runs["0.9.1"])
    assert any("sync_module_states" in p for p in runs["0.9.1"].meta["patches"])
    actor = _spec("verl-actor", strategy="fsdp1")
    runs = _runs(run_case(actor, ["verl==0.7.1", "verl==0.9.1"]))
    assert runs["0.7.1"].signature.name == "microbatch-token-mean"
    _assert_clean(runs["0.9.1"])


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_actor_sequence_mean_aggregations(aggregation: str) -> None:
    """With equal sequences per micro-batch every seq-mean mode is exact even per micro-batch: both agree."""
    spec = _spec("verl-actor").replace(loss__aggregation=aggregation)
    runs = _runs(run_case(spec, ["verl==0.7.1", "verl==0.9.1"]))
    for r in runs.values():
        _assert_clean(r)


@pytest.mark.slow
@pytest.mark.parametrize("pin_text", ["verl==0.5.0", "verl==0.9.1"])
def test_conformance_kit(pin_text: str, tmp_path: Path) -> None:
    """The conformance kit on the default path (SFT): the legacy fsdp_sft_trainer (0.5.0) and the engine (0.9.1)."""
    from stepdiff.harness.conformance import run_conformance
    from stepdiff.harness.runner import parse_pin

    checks = {c.name: c for c in run_conformance(parse_pin(pin_text), workdir=tmp_path)}
    assert set(checks) == {"unsupported", "init", "order", "pre-clip", "repeat", "zero-lr"}
    failed = {n: c.detail for n, c in checks.items() if c.passed is False}
    assert not failed, failed
