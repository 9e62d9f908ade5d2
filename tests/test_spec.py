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


@pytest.mark.parametrize(
    ("raw", "starts", "needle"),
    [
        ({"run": {"rel_tolerance": float("inf")}}, "run.rel_tolerance = inf", "not a finite number"),
        ({"run": {"rel_tolerance": 1e9}}, "run.rel_tolerance = 1000000000.0", "above the float32 ceiling 0.01"),
        ({"model": {"dtype": "bfloat16"}, "run": {"rel_tolerance": 0.5}}, "run.rel_tolerance", "ceiling 0.2"),
        ({"run": {"timeout_s": float("nan")}}, "run.timeout_s = nan", "not a finite number"),
        ({"optimizer": {"lr": float("-inf")}}, "optimizer.lr = -inf", "not a finite number"),
        ({"data": {"samples": [{"prompt": [5], "response": [6], "advantage": float("nan")}]}},
         "data.samples[0].advantage = nan", "finite"),
        ({"model": {"vocab_size": 2**31}}, "model.vocab_size = 2147483648", "ceiling 262144"),
        ({"model": {"num_layers": 2**31}}, "model.num_layers", "ceiling 256"),
        ({"batch": {"micro_batch_size": 10**12}}, "batch.micro_batch_size", "ceiling 4096"),
        ({"batch": {"grad_accum": 4096, "steps": 1000}}, "batch = '4096000 samples'", "ceiling of 100000 samples"),
        ({"model": {"hidden_size": 8192, "intermediate_size": 30000, "num_layers": 64}}, "model = ",
         "above the cpu ceiling"),
        ({"data": {"response_len": [1, 100000]}, "model": {"max_position_embeddings": 131072},
          "batch": {"grad_accum": 200}}, "data = ", "more than 10000000 tokens"),
        ({"faults": 5}, "faults = 5", "expected a table"),
        ({"knobs": 5}, "knobs = 5", "expected a table of knob tables"),
        ({"deepspeed": "x"}, "deepspeed = 'x'", "expected a table"),
        ({"case": 5}, "case = 5", "expected a table"),
        ({"batch": {"grad_accum": {"a": 1}}}, "batch.grad_accum", "a table where a value is expected"),
        ({"case": {"name": ["x"]}}, "case.name", "a list where a single value is expected"),
        ({"deepspeed": {"zero_stage": 2}, "knobs": {"deepspeed": {"zero_stage": 3}}}, "deepspeed", "knobs given twice"),
        ({"case": {"name": "../../x"}}, "case.name = '../../x'", "not usable as a file name"),
        ({"case": {"name": "/abs/path"}}, "case.name", "not usable as a file name"),
        ({"case": {"name": "a\nb"}}, "case.name = 'a\\nb'", "not usable as a file name"),
        ({"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}, "a.b.c.d.e.f", "nested deeper than 6 levels"),
        ({"data": {"samples": [{"prompt": [5], "response": [6], "truncated": True}]}, "rl": {"mask_truncated": True}},
         "data.samples = 'step 0'", "supervises no token"),
        ({"model": {"rope_theta": 10**400}}, "model.rope_theta", "not a finite number"),
        ({"case": {"description": "x" * 20000}}, "case.description = 'xxxx", "longer than 10000 characters"),
    ],
)
def test_the_loader_refuses_what_it_cannot_honour(raw: dict, starts: str, needle: str) -> None:
    with pytest.raises(SpecError) as e:
        S.from_dict(raw)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 500, msg
    assert msg.startswith(starts), msg
    assert needle in msg and "; fix: " in msg, msg


def test_files_that_are_not_regular_utf8_text_are_refused(tmp_path: Path) -> None:
    import os

    (tmp_path / "bin.toml").write_bytes(b'[case]\nname = "\xff\xfe"\n')
    os.mkfifo(tmp_path / "fifo.toml")
    (tmp_path / "deep.toml").write_text("x = " + "[" * 3000 + "]" * 3000)
    (tmp_path / "big.toml").write_bytes(b"#" * (S.MAX_CASE_BYTES + 1))
    for name, needle in (("bin.toml", "is not UTF-8 text (byte 15)"), ("fifo.toml", "not a regular file"),
                         ("deep.toml", "nested deeper than 6 levels"), ("big.toml", "byte ceiling of a case file"),
                         ("", "is a directory")):
        with pytest.raises(SpecError) as e:
            S.load(tmp_path / name)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(SpecError, match="not a regular file"):
        S.load("/dev/zero")


def test_names_become_safe_path_components(tmp_path: Path) -> None:
    from stepdiff.harness.errors import UsageError
    from stepdiff.harness.safepath import component, inside

    for name in ("../../x", "/etc/passwd", "..", ".", "", "a\x00b", "x" * 500, "trl==1.16.0,deepspeed>=0.18"):
        c = component(name)
        assert "/" not in c and c not in (".", "..") and not c.startswith(".") and 0 < len(c) <= 100, (name, c)
        assert inside(tmp_path, name).parent == tmp_path
    assert component("deepspeed-0.19.8") == "deepspeed-0.19.8"
    (tmp_path / "evil").symlink_to("/")  # a folder already there that points elsewhere does not count as inside
    with pytest.raises(UsageError):
        inside(tmp_path, "evil")


def test_replace_a_knob_table_the_case_already_has() -> None:
    """`spec.replace(openrlhf={...})` and `openrlhf__field=` replace the case's own [openrlhf] table."""
    base = S.from_dict({"case": {"name": "k"}, "openrlhf": {"zero_stage": 1, "seed": 7}})
    whole = base.replace(openrlhf={"zero_stage": 3})
    assert whole.knobs_for("openrlhf").zero_stage == 3 and whole.knobs_for("openrlhf").seed == 42  # whole table
    one = base.replace(openrlhf__zero_stage=0)
    assert one.knobs_for("openrlhf").zero_stage == 0 and one.knobs_for("openrlhf").seed == 7  # one field
