"""verl adapter: verl's own SFT, PPO-actor and critic code paths against the reference, with real-release negative
controls (VE-1 legacy actor mean of micro-batch means, VE-2 engine critic sum of micro-batch means, VE-3 legacy SFT
trainer sum of micro-batch means, VE-4 the legacy SFT trainer's loss-mask off-by-one in its multi-turn (0.4-0.5) and
single-turn (0.6-0.7.0) phases, the 0.7.1 engine's padded-response attention mask without remove-padding).

Every verdict comes from the numbers: the fitted micro-batch weights are checked against the patterns the token
counts predict (micro-batch fit) or the token-level fit names (loss-mask phases, VE-4), and every buggy release's
fixed release must come out clean. The default suite needs four verl environments (0.5.0, 0.6.0, 0.7.1, 0.9.1);
0.4.1, 0.6.1, 0.7.0, 0.8.0, world size 2, FSDP1 and the other aggregations are `slow`.
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
    assert VerlAdapter.install_steps("0.7.1") == [["--no-deps", "verl==0.7.1"],
                                                  ["--no-deps", "--no-build-isolation", "flash-attn==2.8.3"]]
    assert VerlAdapter.build_env("0.7.1")["FLASH_ATTENTION_SKIP_CUDA_BUILD"] == "TRUE"
    assert "numpy<2" in VerlAdapter.requirements("0.5.0") and "numpy>=2" in VerlAdapter.requirements("0.9.1")
    assert "setuptools<81" in VerlAdapter.requirements("0.4.1")
    # the SFT datasets: what they cannot carry is unsupported, with the reason
    sft = _spec("verl-sft")
    assert "adamw" in VerlAdapter.unsupported(sft.replace(optimizer__name="sgd"), "0.5.0")  # AdamW hard-coded
    assert VerlAdapter.unsupported(sft.replace(optimizer__name="sgd"), "0.6.1") is None  # build_optimizer
    assert "MultiTurnSFTDataset" in VerlAdapter.unsupported(_spec("verl-sft", dataset="single-turn"), "0.9.1")
    assert "removed in 0.7.1" in VerlAdapter.unsupported(_spec("verl-sft", impl="legacy"), "0.7.1")
    assert "append_eos" in VerlAdapter.unsupported(sft.replace(data__append_eos=False), "0.5.0")
    assert VerlAdapter.unsupported(_spec("verl-sft", dataset="multi-turn").replace(data__append_eos=False),
                                   "0.5.0") is None
    assert "supervise" in VerlAdapter.unsupported(sft.replace(data__supervise="all"), "0.9.1")
    assert "fsdp1" in VerlAdapter.unsupported(_spec("verl-sft-multiturn-mask"), "0.4.0")  # torch.cuda in its loader
    assert "SFT dataset" in VerlAdapter.unsupported(_spec("verl-actor", dataset="multi-turn"), "0.9.1")
    # verl decays every parameter: an exclusion list is unsupported, not silently ignored
    decayed = sft.replace(optimizer__weight_decay=0.1)
    assert VerlAdapter.unsupported(decayed, "0.9.1") is None
    assert "one parameter group" in VerlAdapter.unsupported(decayed.replace(optimizer__no_decay=("norm",)), "0.9.1")


def test_sft_files_carry_the_spec_ids_in_the_sampler_order() -> None:
    """The tokenizer maps the spec's ids one to one (chat template adds nothing), and the parquet row order makes
    DistributedSampler(shuffle=True, seed=0) deal every rank the spec's samples of each step, in order."""
    import torch
    from torch.utils.data import DistributedSampler
    from transformers import AutoTokenizer

    from stepdiff.adapters.verl import sft_data

    spec = _spec("verl-sft").replace(batch__world_size=2, batch__steps=3)
    smp = D.samples(spec)
    rows = sft_data.row_order(spec)
    assert sorted(rows) == list(range(spec.samples_per_step * spec.batch.steps))
    per_rank = spec.samples_per_step // 2
    for rank in (0, 1):
        sampler = DistributedSampler(list(range(len(rows))), num_replicas=2, rank=rank, shuffle=True, drop_last=True)
        sampler.set_epoch(0)
        dealt = [rows[i] for i in sampler]
        for step in range(spec.batch.steps):
            got = [[*smp[i].prompt, *smp[i].response] for i in dealt[step * per_rank:(step + 1) * per_rank]]
            sft_data.check_rows(spec, step, rank, got)
    with pytest.raises(RuntimeError, match="row 0"):
        sft_data.check_rows(spec, 0, 1, [[*smp[0].prompt, *smp[0].response]])
    tok_dir = Path(__import__("tempfile").mkdtemp())
    sft_data.write_tokenizer(spec.replace(model__vocab_size=70000), tok_dir)  # past the first character plane
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = [5, 17, 65533, 65534, 69999, 1]
    assert tok(sft_data.text(ids), add_special_tokens=False)["input_ids"] == ids
    conversation = [{"role": "user", "content": sft_data.text(ids[:2])},
                    {"role": "assistant", "content": sft_data.text(ids[2:])}]
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == ids
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert torch.equal(torch.tensor(tok(sft_data.text(ids) + tok.eos_token)["input_ids"][-1]), torch.tensor(1))


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


def test_sft_multiturn_mask_050_caught_and_named_060_clean() -> None:
    """VE-4, multi-turn phase: MultiTurnSFTDataset marks the assistant tokens, fsdp_sft_trainer <= 0.5 reads the mask
    as prediction positions. One micro-batch per step: only the token-level fit can name it."""
    spec = _spec("verl-sft-multiturn-mask")
    runs = _runs(run_case(spec, ["verl==0.5.0", "verl==0.6.0"]))
    bug, ok = runs["0.5.0"], runs["0.6.0"]
    for r in (bug, ok):
        assert r.meta["extra"]["dataset"] == "MultiTurnSFTDataset" and "FSDPSFTTrainer(" in r.meta["code_path"]
    assert bug.verdict == "diverge" and 0.05 < bug.max_rel_grad_error < 2
    assert bug.signature.name == "unexplained"  # no re-weighting of micro-batches explains a mask shift
    assert bug.tokens.name == "token-mask" and bug.tokens.residual < 1e-5
    assert bug.tokens.text.startswith("first response token never trained; padding after the last token trained")
    _assert_clean(ok)


def test_sft_single_turn_mask_060_caught_and_named_engine_071_clean() -> None:
    """VE-4, single-turn phase: SFTDataset marks prediction positions, fsdp_sft_trainer >= 0.6 reads them as token
    membership; verl 0.7.1's only SFT trainer (engine + MultiTurnSFTDataset) trains the right tokens."""
    spec = _spec("verl-sft-single-turn-mask")
    runs = _runs(run_case(spec, ["verl==0.6.0", "verl==0.7.1"]))
    bug, ok = runs["0.6.0"], runs["0.7.1"]
    assert bug.meta["extra"]["dataset"] == "SFTDataset" and "FSDPSFTTrainer(" in bug.meta["code_path"]
    assert ok.meta["extra"]["dataset"] == "MultiTurnSFTDataset" and "SFTTrainer(config)" in ok.meta["code_path"]
    assert bug.verdict == "diverge" and bug.signature.name == "unexplained"
    assert bug.tokens.name == "token-mask" and bug.tokens.residual < 1e-5
    assert bug.tokens.text == "last response token (EOS) never trained; last prompt token trained as a target"
    _assert_clean(ok)


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
    """0.5.0: VE-3 (sum of micro-batch means), right tokens. 0.6.1: VE-3 fixed but the single-turn mask shifted
    (VE-4) on top of a mean of micro-batch means; with its own multi-turn dataset only the mean of means is left."""
    spec = _spec("verl-sft")
    runs = _runs(run_case(spec, ["verl==0.5.0", "verl==0.6.1", "verl==0.9.1"]))
    assert runs["0.5.0"].signature.name == "microbatch-token-mean-summed"
    assert runs["0.6.1"].verdict == "diverge" and runs["0.6.1"].tokens.name == "token-mask"
    _assert_clean(runs["0.9.1"])
    multi = _spec("verl-sft", dataset="multi-turn")
    runs = _runs(run_case(multi, ["verl==0.6.1"]))
    assert runs["0.6.1"].signature.name == "microbatch-token-mean"
    _assert_weights(runs["0.6.1"], _pattern(multi, "microbatch-token-mean"))


@pytest.mark.slow
@pytest.mark.parametrize(("pin", "dataset", "finding"), [
    ("verl==0.4.1", "multi-turn", "first response token never trained"),  # first release line with the dataset
    ("verl==0.4.1", "single-turn", None),
    ("verl==0.7.0", "single-turn", "last response token (EOS) never trained"),  # last release with the trainer
    ("verl==0.7.0", "multi-turn", None),
])
def test_sft_mask_window_edges(pin: str, dataset: str, finding: str | None) -> None:
    run = run_case(_spec("verl-sft-multiturn-mask", dataset=dataset), [pin]).runs[0]
    if finding is None:
        _assert_clean(run)
    else:
        assert run.verdict == "diverge" and run.tokens.text.startswith(finding), run.tokens


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


def test_adamw_state_read_from_verls_own_optimizer() -> None:
    """Three AdamW steps through the engine SFT trainer and verl's build_optimizer: Adam's moments and step counter
    are gathered from verl's own FSDP2 optimizer and agree with the reference's step after step. (The same state
    check says "diverge" on an injected optimizer fault: tests/test_optimizer.py's mutants.)"""
    run = run_case(S.load(CASES / "adamw-3steps-verl.toml"), ["verl==0.9.1"]).runs[0]
    assert run.verdict == "agree", run.reason
    assert run.compared["state"] == "exp_avg, exp_avg_sq, step"
    for st in run.steps:
        assert set(st.state) == {"exp_avg", "exp_avg_sq"}
        assert st.state["exp_avg"].total.rel < 1e-5 and st.state["exp_avg_sq"].total.rel < 1e-5
        assert st.opt_step == st.opt_step_ref == st.step + 1
