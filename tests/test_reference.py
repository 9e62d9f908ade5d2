"""The reference's own math: contributions sum to the step gradient, losses have the properties their definitions
imply, fp32 agrees with fp64, and a hand-written token-mean step matches it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from stepdiff.harness import data as D
from stepdiff.harness import spec as S
from stepdiff.harness.diff import dict_diff

from .conftest import run_reference


def contributions(rec, step: int, spec: S.Spec) -> list[dict[str, torch.Tensor]]:
    out = []
    for r in range(spec.batch.world_size):
        for m in range(spec.batch.grad_accum):
            p = f"contrib/{step}/{r}/{m}/"
            out.append({k[len(p):]: v for k, v in rec.extras.items() if k.startswith(p)})
    return out


def test_contributions_sum_to_step_gradient(tmp_path: Path) -> None:
    spec = S.from_dict({"batch": {"grad_accum": 3, "world_size": 2, "steps": 2}})
    rec, _ = run_reference(spec, tmp_path)
    for s in range(2):
        cs = contributions(rec, s, spec)
        assert len(cs) == 6
        summed = {n: sum(c[n] for c in cs) for n in cs[0]}
        assert dict_diff(summed, rec.steps[s].grads).total.rel < 1e-6


def test_token_mean_matches_hand_written_step(tmp_path: Path) -> None:
    """One global token mean over all micro-batches and ranks, computed in one shot, equals the reference."""
    from stepdiff.adapters.common import build_model

    spec = S.from_dict({"batch": {"grad_accum": 2, "world_size": 2, "micro_batch_size": 2}})
    rec, init = run_reference(spec, tmp_path)
    model = build_model(spec, init)
    idx = [i for r in range(2) for m in range(2) for i in D.micro_batch_indices(spec, 0, r, m)]
    mb = D.collate(spec, idx)
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), mb.input_ids[:, 1:], reduction="none")
    mask = mb.loss_mask[:, 1:].float()
    loss = (ce * mask).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert dict_diff(grads, rec.steps[0].grads).total.rel < 1e-5
    assert rec.steps[0].loss == pytest.approx(float(loss.detach()), rel=1e-6)


def test_fp32_close_to_fp64(tmp_path: Path) -> None:
    spec = S.from_dict({"batch": {"grad_accum": 2}})
    r32, _ = run_reference(spec, tmp_path)
    r64, _ = run_reference(spec, tmp_path, dtype="float64")
    err = dict_diff(r32.steps[0].grads, r64.steps[0].grads).total.rel
    assert 0 < err < 1e-5  # nonzero: the two precisions really differ; small: fp32 is accurate


def test_policy_with_unit_advantages_equals_sft(tmp_path: Path) -> None:
    """-A * grad(logp) with A = 1 is the cross-entropy gradient."""
    base = {"batch": {"grad_accum": 2}, "optimizer": {"lr": 0.0}}
    sft = S.from_dict(base)
    smp = tuple(S.Sample(prompt=s.prompt, response=s.response, advantage=1.0) for s in D.samples(sft))
    pol = S.from_dict({**base, "loss": {"kind": "policy"}, "data": {"samples": [S.to_dict(s) for s in smp]}})
    a, _ = run_reference(sft, tmp_path)
    b, _ = run_reference(pol, tmp_path)
    assert dict_diff(b.steps[0].grads, a.steps[0].grads).total.rel < 1e-6


def test_policy_mask_truncated_removes_samples(tmp_path: Path) -> None:
    """With rl.mask_truncated a truncated sample's contribution is exactly zero and the normaliser excludes it."""
    base = S.from_dict({"batch": {"grad_accum": 2}, "loss": {"kind": "policy"}})
    smp = list(D.samples(base))
    smp[1] = S.Sample(prompt=smp[1].prompt, response=smp[1].response, advantage=smp[1].advantage, truncated=True)
    spec = S.from_dict({**S.to_dict(base), "data": {"samples": [S.to_dict(s) for s in smp]},
                        "rl": {"mask_truncated": True}})
    rec, _ = run_reference(spec, tmp_path)
    cs = contributions(rec, 0, spec)
    assert all(float(t.abs().max()) == 0.0 for t in cs[1].values())
    assert D.step_norms(spec, 0).tokens == D.token_count(spec, smp[0])


def test_group_normalized_advantages() -> None:
    spec = S.from_dict({"batch": {"micro_batch_size": 2, "grad_accum": 2}, "loss": {"kind": "policy"},
                        "rl": {"group_size": 2, "advantage": "group-normalized"}})
    smp = D.samples(spec)
    adv = D.sample_advantages(spec)
    for g in range(0, 4, 2):
        assert smp[g].prompt == smp[g + 1].prompt  # a group shares its prompt
        r0, r1 = smp[g].reward, smp[g + 1].reward
        std = abs(r0 - r1) / math.sqrt(2)
        expected = 0.0 if r0 == r1 else (r0 - (r0 + r1) / 2) / (std + 1e-4)
        assert adv[g] == pytest.approx(expected)
        assert adv[g] + adv[g + 1] == pytest.approx(0.0, abs=1e-9)


def test_value_loss_gradient_direction(tmp_path: Path) -> None:
    """Value targets far above the initial values: one SGD step raises every supervised value."""
    from stepdiff.adapters.common import build_model

    base = S.from_dict({"loss": {"kind": "value"}, "optimizer": {"lr": 0.01}})
    smp = tuple(S.Sample(prompt=s.prompt, response=s.response, value_target=5.0) for s in D.samples(base))
    spec = S.from_dict({**S.to_dict(base), "data": {"samples": [S.to_dict(s) for s in smp]}})
    rec, init = run_reference(spec, tmp_path)
    model = build_model(spec, init)
    mb = D.collate(spec, [0])
    before = model(input_ids=mb.input_ids).logits[0, :-1, 0]
    model.load_state_dict(rec.steps[0].params)
    after = model(input_ids=mb.input_ids).logits[0, :-1, 0]
    sel = mb.loss_mask[0, 1:].bool()
    assert bool((after[sel] > before[sel]).all())
    assert "score.weight" in rec.steps[0].grads and "lm_head.weight" not in rec.steps[0].grads


def test_dpo_at_init_is_log2(tmp_path: Path) -> None:
    """At the initial weights the policy equals the reference model: every pair's loss is log 2."""
    spec = S.from_dict({"loss": {"kind": "dpo"}, "batch": {"grad_accum": 2}, "optimizer": {"lr": 0.0}})
    assert all(s.rejected for s in D.samples(spec))
    rec, _ = run_reference(spec, tmp_path)
    assert rec.steps[0].loss == pytest.approx(math.log(2), rel=1e-6)
    assert rec.steps[0].grad_norm > 0


def test_fp64_calibration_records_unclipped_gradients(tmp_path: Path) -> None:
    """Regression: clipping worked in place on a tensor the fp64 record aliased, so the calibration run recorded
    clipped gradients and the calibrated bound grew to ~150 (a silent pass)."""
    spec = S.from_dict({"batch": {"grad_accum": 2}, "optimizer": {"clip_grad_norm": 1e-3}})
    r32, _ = run_reference(spec, tmp_path)
    r64, _ = run_reference(spec, tmp_path, dtype="float64")
    assert dict_diff(r32.steps[0].grads, r64.steps[0].grads).total.rel < 1e-5
    assert r64.steps[0].grad_norm > 100 * 1e-3  # recorded norm is the pre-clip one


def test_every_model_has_dropout_zero(tmp_path: Path) -> None:
    """Regression: the value model (LlamaForTokenClassification) defaulted to classifier dropout 0.1 in train mode,
    which made the reference's critic gradient random; any active dropout is now refused."""
    from stepdiff.adapters.common import assert_no_dropout, build_model

    spec = S.from_dict({"loss": {"kind": "value"}})
    a, _ = run_reference(spec, tmp_path)
    b, _ = run_reference(spec, tmp_path)
    assert dict_diff(a.steps[0].grads, b.steps[0].grads).total.rel == 0.0
    model = build_model(spec, None)
    model.score_dropout = torch.nn.Dropout(0.1)
    with pytest.raises(RuntimeError, match="dropout is active"):
        assert_no_dropout(model)
