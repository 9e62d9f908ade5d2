"""The diff engine, tolerances and the micro-batch weight fit on synthetic gradients."""

from __future__ import annotations

import math

import pytest
import torch

from stepdiff.harness.diff import dict_diff, scalar_rel, tensor_diff
from stepdiff.harness.signatures import candidate_patterns, describe, fit_weights
from stepdiff.harness.tolerance import CalibrationError, bound_for


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_tensor_diff_numbers() -> None:
    r = torch.tensor([3.0, 4.0])
    d = tensor_diff("x", torch.tensor([3.0, 4.5]), r)
    assert d.rel == pytest.approx(0.1)
    assert d.max_abs == pytest.approx(0.5)
    assert d.cosine == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))
    assert tensor_diff("x", r, r).rel == 0.0


def test_dict_diff_ranks_and_guards() -> None:
    ref = {"a": rand(10, seed=0), "b": rand(10, seed=1), "tiny": torch.full((10,), 1e-12)}
    a = {"a": ref["a"], "b": ref["b"] * 1.5, "tiny": torch.full((10,), 2e-12)}
    dd = dict_diff(a, ref)
    assert dd.per_param[0].name == "b" and dd.per_param[0].rel == pytest.approx(0.5)
    tiny = next(p for p in dd.per_param if p.name == "tiny")
    assert tiny.rel < 1e-6  # guarded: 1e-12 of noise on a zero-ish gradient is not a 100 % error
    assert dd.total.rel == pytest.approx(0.5 * float(ref["b"].norm()) / math.sqrt(
        float(ref["a"].norm()) ** 2 + float(ref["b"].norm()) ** 2), rel=1e-6)
    missing = dict_diff({"a": ref["a"]}, ref)
    assert set(missing.missing) == {"b", "tiny"}


def test_scalar_rel() -> None:
    assert scalar_rel(1.1, 1.0) == pytest.approx(0.1)
    assert scalar_rel(None, 1.0) is None
    assert scalar_rel(float("nan"), 1.0) is None


def test_bound_is_calibrated_and_named() -> None:
    b = bound_for("float32", 1e-7)
    assert b.value == 1e-4 and "floor" in b.source
    b = bound_for("float32", 1e-5)
    assert b.value == pytest.approx(1e-3) and "100 x reference" in b.source
    assert bound_for("bfloat16", None).value == 3e-3  # uncalibrated bf16: the floor, below any bf16 self-error
    assert bound_for("float32", 1e-7, override=0.2).value == 0.2
    with pytest.raises(CalibrationError, match="refusing to compare"):
        bound_for("float32", 1.5)  # a reference that disagrees with itself never widens the bound


def contribs(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [{"w": rand(30, 20, seed=seed + i), "b": rand(7, seed=seed + 100 + i)} for i in range(k)]


def combine(cs: list[dict[str, torch.Tensor]], w: list[float]) -> dict[str, torch.Tensor]:
    return {n: torch.stack([wi * c[n] for wi, c in zip(w, cs, strict=True)]).sum(0) for n in cs[0]}


@pytest.mark.parametrize("weights", [[1, 0, 0, 1], [1, 1, 1, 1], [0.5, 2.0, 1.0, 3.0]])
def test_fit_recovers_weights(weights: list[float]) -> None:
    cs = contribs(4)
    fit = fit_weights(combine(cs, weights), cs)
    assert fit.weights == pytest.approx(weights, abs=1e-6)
    assert fit.residual < 1e-6


def test_fit_residual_flags_non_reweighting() -> None:
    cs = contribs(3)
    g = combine(cs, [1, 1, 1])
    g["w"] = g["w"] + 0.3 * rand(30, 20, seed=999)
    assert fit_weights(g, cs).residual > 0.05


def test_describe_names_patterns() -> None:
    counts = [[3, 28]]  # one rank, two micro-batches with very different token counts
    cs = contribs(2)
    pats = candidate_patterns(counts)
    mom = pats["microbatch-token-mean"][0]
    assert mom == pytest.approx([31 / 6, 31 / 56])
    assert describe(fit_weights(combine(cs, mom), cs), counts).name == "microbatch-token-mean"
    summed = pats["microbatch-token-mean-summed"][0]
    assert describe(fit_weights(combine(cs, summed), cs), counts).name == "microbatch-token-mean-summed"
    assert describe(fit_weights(combine(cs, [1, 1]), cs), counts).name == "correct"
    assert describe(fit_weights(combine(cs, [0.3, 0.3]), cs), counts).name == "uniform-scale"
    four = contribs(4)
    sig = describe(fit_weights(combine(four, [1, 0, 0, 1]), four, [f"mb {i}" for i in range(4)]), [[5, 6, 7, 8]])
    assert sig.name == "dropped-microbatches" and "mb 1, mb 2" in sig.text


def test_describe_rank_patterns() -> None:
    counts = [[4, 10], [20, 2]]  # 2 ranks x 2 micro-batches
    cs = contribs(4)
    assert candidate_patterns(counts)["microbatch-token-mean-summed"][0] == pytest.approx([36 / 8, 36 / 20, 36 / 40,
                                                                                          36 / 4])
    for name in ("rank-token-mean", "microstep-token-mean", "microbatch-token-mean-summed"):
        w = candidate_patterns(counts)[name][0]
        assert describe(fit_weights(combine(cs, w), cs), counts).name == name


def test_supervision_check_names_off_by_one() -> None:
    from stepdiff.harness import data as D
    from stepdiff.harness import spec as S
    from stepdiff.harness.compare import check_supervision

    spec = S.from_dict({"data": {"samples": [{"prompt": [5, 6, 7], "response": [8, 9, 1]},
                                             {"prompt": [5, 6], "response": [8, 1]}]}, "batch": {"grad_accum": 2}})
    right = {str(i): [t for t, on in enumerate(D.supervised_targets(spec, s), 1) if on]
             for i, s in enumerate(D.samples(spec))}
    assert right == {"0": [3, 4, 5], "1": [2, 3]}
    assert check_supervision(spec, right) == []
    shifted = {"0": [2, 3, 4], "1": [1, 2]}  # the last prompt token trained, EOS not
    found = check_supervision(spec, shifted)
    assert "last token (EOS) not supervised (samples 0, 1)" in found
    assert "last prompt token supervised (samples 0, 1)" in found
    dropped_first = {"0": [4, 5], "1": [3]}
    assert check_supervision(spec, dropped_first) == ["first response token not supervised (samples 0, 1)"]


def test_token_fit_names_mask_shapes() -> None:
    from stepdiff.harness.signatures import token_fit

    # two samples: prompt lengths 3 and 2; targets t = 1..5 and 1..4; supervised = response targets
    prompt = {0: 3, 1: 2}
    positions = {0: range(1, 6), 1: range(1, 5)}
    supervised = {0: {3, 4, 5}, 1: {2, 3, 4}}
    keys = [(s, t) for s in (0, 1) for t in positions[s]]
    cs = {k: {"w": rand(40, 30, seed=7 * i), "b": rand(9, seed=500 + i)} for i, k in enumerate(keys)}

    def grad(weight: dict[tuple[int, int], float]) -> dict[str, torch.Tensor]:
        return {n: torch.stack([weight.get(k, 0.0) * cs[k][n] for k in keys]).sum(0) for n in ("w", "b")}

    correct = {(s, t): 1.0 for s in supervised for t in supervised[s]}
    assert token_fit(grad(correct), cs, supervised, prompt).name == "correct"
    no_first = {k: v for k, v in correct.items() if k not in {(0, 3), (1, 2)}}
    found = token_fit(grad(no_first), cs, supervised, prompt)
    assert found.name == "token-mask" and found.text == "first response token never trained"
    shifted = {(0, 2): 1.0, (0, 3): 1.0, (0, 4): 1.0, (1, 1): 1.0, (1, 2): 1.0, (1, 3): 1.0}
    assert token_fit(grad(shifted), cs, supervised, prompt).text == (
        "last response token (EOS) never trained; last prompt token trained as a target")
    halves = {k: (0.5 if k[0] == 1 else 1.0) for k in correct}
    found = token_fit(grad(halves), cs, supervised, prompt)
    assert found.name == "sample-weights" and "1: 0.5" in found.text
    noisy = grad(correct)
    noisy["w"] = noisy["w"] + 0.2 * rand(40, 30, seed=12345)
    assert token_fit(noisy, cs, supervised, prompt).name == "unexplained"


def test_token_fit_names_padding_trained_after_the_last_token() -> None:
    """A mask shifted one token late on right-padded rows: the first response token is never trained and the padding
    token after the last one is, except in a row that fills the padded length (nothing follows it)."""
    from stepdiff.harness.signatures import token_fit

    prompt = {0: 3, 1: 2}
    positions = {0: range(1, 7), 1: range(1, 6)}  # sample 0: targets 1..5, padding target 6; sample 1: 1..4, 5
    supervised = {0: {3, 4, 5}, 1: {2, 3, 4}}
    padding = {0: 6, 1: 5}
    keys = [(s, t) for s in (0, 1) for t in positions[s]]
    cs = {k: {"w": rand(40, 30, seed=11 * i + 3), "b": rand(9, seed=700 + i)} for i, k in enumerate(keys)}

    def grad(weight: dict[tuple[int, int], float]) -> dict[str, torch.Tensor]:
        return {n: torch.stack([weight.get(k, 0.0) * cs[k][n] for k in keys]).sum(0) for n in ("w", "b")}

    correct = {(s, t): 1.0 for s in supervised for t in supervised[s]}
    assert token_fit(grad(correct), cs, supervised, prompt, padding).name == "correct"
    late = {(0, 4): 1.0, (0, 5): 1.0, (1, 3): 1.0, (1, 4): 1.0, (1, 5): 1.0}  # sample 0 fills the padded length
    found = token_fit(grad(late), cs, supervised, prompt, padding)
    assert found.name == "token-mask"
    assert found.text == ("first response token never trained; padding after the last token trained as a target "
                          "(samples 1)")
    assert "padding" not in token_fit(grad(late), cs, supervised, prompt).text  # without the padding targets: not named


def test_two_bugs_at_once_and_ties() -> None:
    counts = [[2, 30, 3, 12]]
    cs = contribs(4)
    mom = candidate_patterns(counts)["microbatch-token-mean"][0]
    both = [mom[0], 0.0, 0.0, mom[3]]  # DeepSpeed drops the middle, OpenRLHF's mean of means weights the rest
    sig = describe(fit_weights(combine(cs, both), cs, [f"mb {i}" for i in range(4)]), counts)
    assert sig.name == "dropped-microbatches+microbatch-token-mean" and sig.text.startswith("mb 1, mb 2 got weight 0")
    ranks = [[2], [30]]  # one micro-batch per rank: a per-micro-batch mean is a per-rank mean; the rank name wins
    two = contribs(2)
    sig = describe(fit_weights(combine(two, candidate_patterns(ranks)["rank-token-mean"][0]), two), ranks)
    assert sig.name == "rank-token-mean" and "microbatch-token-mean" in sig.text


def test_odd_one_out_is_the_wrong_one_and_same_bug_is_grouped() -> None:
    from stepdiff.harness import spec as S
    from stepdiff.harness.compare import RunResult
    from stepdiff.harness.runner import CaseResult, name_groups
    from stepdiff.harness.tolerance import Bound

    def case(verdicts: dict[str, str], close: set[frozenset[str]]) -> CaseResult:
        runs = [RunResult(k.split("==")[0], k.split("==")[1], v, "") for k, v in verdicts.items()]
        res = CaseResult("c", S.Spec(), runs, Bound(1e-4, "test"))
        res.pairwise = {a: {b: (1e-7 if frozenset((a, b)) in close else 1.0) for b in verdicts if b != a}
                        for a in verdicts}
        name_groups(res)
        return res

    # two releases with the same bug agree with each other; the correct release must not be called odd
    res = case({"x==1": "diverge", "x==2": "diverge", "x==3": "agree"}, {frozenset(("x==1", "x==2"))})
    assert res.odd_one_out is None
    assert res.same_numbers == [["x==1", "x==2"], ["x==3"]]
    res = case({"x==1": "diverge", "x==2": "agree", "x==3": "agree"}, {frozenset(("x==2", "x==3"))})
    assert res.odd_one_out == "x==1"
