"""Spec loading and validation: every bad input is a one-line error naming the field, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepdiff.harness import data as D
from stepdiff.harness import spec as S
from stepdiff.harness.cli import bundled_cases
from stepdiff.harness.errors import SpecError


@pytest.mark.parametrize(
    ("raw", "field", "fix"),
    [
        ({"batch": {"grad_acum": 4}}, "batch.grad_acum", "did you mean 'grad_accum'"),
        ({"batch": {"grad_accum": 0}}, "batch.grad_accum", "1 or more"),
        ({"batch": {"grad_accum": 2.5}}, "batch.grad_accum", "<integer>"),
        ({"optimizer": {"name": "adam"}}, "optimizer.name", "'sgd', 'adamw'"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas", "[..., ...]"),
        ({"model": {"num_heads": 3}}, "model.num_heads", "divisor of model.hidden_size"),
        ({"model": {"dtype": "fp16"}}, "model.dtype", "'float32'"),
        ({"deepsped": {"zero_stage": 2}}, "deepsped", "did you mean 'deepspeed'"),
        ({"deepspeed": {"offload_optimizer": "gpu"}}, "deepspeed.offload_optimizer", "'none', 'cpu'"),
        ({"data": {"samples": [{"prompt": [5], "response": [99]}]}}, "data.samples[0]", "below model.vocab_size"),
        ({"data": {"samples": [{"prompt": [5], "response": [6]}]}, "batch": {"grad_accum": 2}}, "data.samples",
         "give 2 samples"),
        ({"data": {"prompt_len": [5, 2]}}, "data.prompt_len", "[1, 8]"),
        ({"loss": {"kind": "policy"}, "rl": {"group_size": 3, "advantage": "group-normalized"},
          "batch": {"grad_accum": 2}}, "rl.group_size", "multiple of rl.group_size"),
    ],
)
def test_bad_input_names_field_and_fix(raw: dict, field: str, fix: str) -> None:
    with pytest.raises(SpecError) as e:
        S.from_dict(raw)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(field), msg
    assert fix in msg, msg


def test_broken_toml_names_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[batch\ngrad_accum = 2\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        S.load(p)
    with pytest.raises(SpecError, match="file not found"):
        S.load(tmp_path / "missing.toml")


def test_round_trip_and_replace() -> None:
    s = S.from_dict({"batch": {"grad_accum": 4}, "deepspeed": {"zero_stage": 3}})
    assert S.from_dict(S.to_dict(s)) == s
    r = s.replace(batch__grad_accum=2, optimizer__lr=0.5)
    assert (r.batch.grad_accum, r.optimizer.lr, r.knobs_for("deepspeed").zero_stage) == (2, 0.5, 3)
    with pytest.raises(SpecError):
        s.replace(batch__grad_accum=-1)


def test_every_field_documented() -> None:
    rows = S.field_docs()
    assert len(rows) > 40
    assert all(text for _, _, text in rows), [n for n, _, t in rows if not t]


@pytest.mark.parametrize("path", bundled_cases(), ids=lambda p: p.stem)
def test_bundled_cases_load(path: Path) -> None:
    s = S.load(path)
    assert s.case.frameworks, "a bundled case names the frameworks it runs"
    assert len(D.samples(s)) >= s.samples_per_step * s.batch.steps


def test_placement_is_rank_major_and_disjoint() -> None:
    s = S.from_dict({"batch": {"micro_batch_size": 2, "grad_accum": 3, "world_size": 2, "steps": 2}})
    seen = [i for st in range(2) for r in range(2) for m in range(3) for i in D.micro_batch_indices(s, st, r, m)]
    assert seen == list(range(24))
    assert D.rank_indices(s, 1)[:6] == [6, 7, 8, 9, 10, 11]


def test_supervision_is_response_targets() -> None:
    s = S.from_dict({"data": {"samples": [{"prompt": [5, 6, 7], "response": [8, 9, 1]}]}})
    mb = D.collate(s, [0])
    assert mb.loss_mask.tolist() == [[0, 0, 0, 1, 1, 1]]  # first response token and EOS are targets
    assert mb.labels.tolist() == [[-100, -100, -100, 8, 9, 1]]
    s_all = s.replace(data__supervise="all")
    assert D.collate(s_all, [0]).loss_mask.tolist() == [[0, 1, 1, 1, 1, 1]]


def test_generated_samples_are_seeded() -> None:
    a = S.from_dict({"batch": {"grad_accum": 4}})
    assert D.samples(a) == D.samples(a)
    assert D.samples(a) != D.samples(a.replace(data__seed=7))
    assert all(s.response[-1] == 1 for s in D.samples(a))
