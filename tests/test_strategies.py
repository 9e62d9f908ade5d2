"""The fuzzing strategies draw only valid specs, over the whole spec, within each adapter's capabilities; --vary and
--fix narrow them; explicit-sample cases are fuzzed by reordering and trimming/extending; cases round-trip to TOML.
No framework runs here: drawing and validating is pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stepdiff.harness import data as D
from stepdiff.harness import spec as S
from stepdiff.harness import strategies as ST
from stepdiff.harness.casefile import toml_text, write_case
from stepdiff.harness.cli import resolve_case
from stepdiff.harness.errors import SpecError, UsageError
from stepdiff.harness.registry import get_adapter


def drawn(space: ST.Space, n: int = 60) -> list[tuple[dict[str, Any], S.Spec]]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    out: list[tuple[dict[str, Any], S.Spec]] = []

    @settings(max_examples=n, database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def t(data: Any) -> None:
        cfg = ST.draw(data, space)
        try:
            out.append((cfg, ST.apply(space, cfg)))
        except SpecError:
            pass

    t()
    return out


def test_default_strategy_covers_the_whole_spec() -> None:
    base = S.load(resolve_case("deepspeed-zero2-offload-ga4"))
    space = ST.build_space(base, "deepspeed")
    assert {"batch.world_size", "batch.steps", "model.dtype", "optimizer.name", "optimizer.clip_grad_norm",
            "deepspeed.zero_stage", "deepspeed.offload_optimizer", "deepspeed.overlap_comm", "data.samples"} <= set(
        space.active)
    runs = drawn(space, 80)
    assert len(runs) >= 60
    seen: dict[str, set[Any]] = {}
    for cfg, spec in runs:
        for k, v in cfg.items():
            if k != "data.samples":
                seen.setdefault(k, set()).add(v if not isinstance(v, list) else tuple(v))
        assert len(spec.data.samples) == spec.samples_per_step * spec.batch.steps
        for s in spec.data.samples:
            assert 1 <= len(s.prompt) <= 12 and 1 <= len(s.response) <= 40
            assert s.response[-1] == spec.data.eos_id  # drawn with the frameworks' constraint: a closing EOS
    assert seen["batch.world_size"] == {1, 2}
    assert seen["batch.grad_accum"] == {1, 2, 3, 4}
    assert seen["batch.steps"] >= {1, 4}
    assert seen["model.dtype"] == {"float32", "bfloat16"}
    assert seen["optimizer.name"] == {"sgd", "adamw"}
    assert seen["deepspeed.zero_stage"] == {0, 1, 2, 3}
    assert seen["deepspeed.offload_optimizer"] == {"cpu", "none"}
    assert 1e-3 in seen["optimizer.clip_grad_norm"]
    lengths = [len(s.response) for _, spec in runs for s in spec.data.samples]
    assert min(lengths) == 1 and max(lengths) >= 30  # from a lone EOS to long
    # very unequal micro-batches: some drawn step has one micro-batch with 10x the tokens of another
    ratios = [max(c) / max(min(c), 1) for _, spec in runs for c in D.microbatch_token_counts(spec, 0) if len(c) > 1]
    assert max(ratios) >= 10


def configurations(space: ST.Space) -> Any:
    """The space as a plain strategy of configurations (for hypothesis.find)."""
    from hypothesis import strategies as st

    class Data:
        def __init__(self, draw: Any) -> None:
            self._draw = draw

        def draw(self, strategy: Any, label: str | None = None) -> Any:
            return self._draw(strategy)

    return st.composite(lambda draw: ST.draw(Data(draw), space))()


def test_choices_shrink_toward_the_base_and_counts_toward_one() -> None:
    from hypothesis import find, settings

    base = S.load(resolve_case("deepspeed-zero2-offload-ga4"))
    space = ST.build_space(base, "deepspeed")
    # the minimal configuration with grad_accum >= 3: everything else at the base's value or at its smallest
    found = find(configurations(space), lambda c: c["batch.grad_accum"] >= 3,
                 settings=settings(database=None, derandomize=True))
    assert found["batch.grad_accum"] == 3
    assert found["batch.world_size"] == 1 and found["batch.micro_batch_size"] == 1 and found["batch.steps"] == 1
    assert found["deepspeed.offload_optimizer"] == "cpu" and found["deepspeed.zero_stage"] == 2  # the base's
    assert found["model.dtype"] == "float32" and found["optimizer.name"] == "sgd"
    assert found["data.samples"] == {"lengths": [[1, 1], [1, 1], [1, 1]]}


def test_capabilities_constrain_the_domains() -> None:
    base = S.load(resolve_case("openrlhf-sft-mean-of-means"))
    space = ST.build_space(base, "openrlhf")
    runs = drawn(space, 40)
    assert {cfg.get("optimizer.name", "adamw") for cfg, _ in runs} == {"adamw"}  # OpenRLHF builds AdamW only
    assert ST.knob_domain("openrlhf", "zero_stage", 2) == (2, 0, 1, 3)
    assert ST.knob_domain("faults", "mode", "drop") == ("drop",)  # faults.fuzz_knobs: the case picks the fault
    assert ST.world_sizes("verl", ST.Limits()) == [1, 2]
    unsupported = [s for _, s in runs if get_adapter("openrlhf").unsupported(s)]
    assert any("weight_decay" in get_adapter("openrlhf").unsupported(s) for s in unsupported)


def test_explicit_samples_are_reordered_trimmed_and_extended() -> None:
    base = S.load(resolve_case("openrlhf-sft-mean-of-means"))
    space = ST.build_space(base, "openrlhf")
    prompts = {s.prompt: s for s in base.data.samples}
    changed = 0
    for _, spec in drawn(space, 40):
        for s in spec.data.samples:
            src = prompts[s.prompt]  # every sample comes from a base sample (same prompt)
            assert s.response[-1] == src.response[-1] == 1  # the closing EOS is kept
            changed += s.response != src.response
    assert changed > 0
    # the simplest draw is the base case itself
    shape = {"order": [0, 1, 2, 3], "edits": [[0, 0]] * 2}
    spec = ST.apply(space, {"batch.grad_accum": 2, "data.samples": shape})
    assert spec.data.samples == base.data.samples[:2]
    # the written case's description says the samples were trimmed (spec_changes leaves samples out)
    assert ST.samples_change(base, spec) == "2 of the base case's 4 (0, 1 unchanged)"
    assert ST.samples_change(base, base) is None
    edited = spec.replace(data__samples=(base.data.samples[1], S.Sample(prompt=(11, 12, 13), response=(5, 1))))
    assert ST.samples_change(base, edited) == "2 of the base case's 4 (1 unchanged; 1 edited)"
    drawn_case = S.load(resolve_case("deepspeed-zero2-offload-ga4"))
    assert ST.samples_change(drawn_case, spec) == "2 drawn samples (the base case draws its own)"


def test_vary_and_fix_narrow_the_space() -> None:
    base = S.load(resolve_case("deepspeed-zero2-offload-ga4"))
    space = ST.build_space(base, "deepspeed", vary=["batch.grad_accum", "deepspeed.overlap_comm"],
                           fix=ST.parse_fix(["deepspeed.zero_stage=1", "optimizer.clip_grad_norm=0.5"]))
    assert space.active == ("batch.grad_accum", "deepspeed.overlap_comm")
    for cfg, spec in drawn(space, 20):
        assert set(cfg) <= {"batch.grad_accum", "deepspeed.overlap_comm", "deepspeed.zero_stage",
                            "optimizer.clip_grad_norm"}
        assert spec.knobs_for("deepspeed").zero_stage == 1 and spec.optimizer.clip_grad_norm == 0.5
        assert spec.knobs_for("deepspeed").offload_optimizer == "cpu" and spec.batch.micro_batch_size == 1
    with pytest.raises(UsageError, match="did you mean 'batch.grad_accum'"):
        ST.build_space(base, "deepspeed", vary=["batch.grad_acum"])
    with pytest.raises(UsageError, match="batch.grad_accum"):
        ST.build_space(base, "deepspeed", fix={"batch.grad_accum": 0})
    kept = ST.build_space(base, "deepspeed", fix=ST.parse_fix(["batch.grad_accum"]))
    assert kept.fixed["batch.grad_accum"] == 4 and "batch.grad_accum" not in kept.active


def test_saved_case_round_trips_exactly(tmp_path: Path) -> None:
    base = S.load(resolve_case("deepspeed-zero2-offload-ga4"))
    space = ST.build_space(base, "deepspeed")
    cfg, spec = drawn(space, 5)[-1]
    path = write_case(spec, tmp_path / "found.toml", "a finding\nsecond line")
    again = S.load(path)
    assert S.to_dict(again) == S.to_dict(spec)
    text = path.read_text()
    assert text.startswith("# a finding\n# second line\n")
    assert "[deepspeed]" in text and "samples = [" in text
    assert "advantage = 0" not in toml_text(spec) and "value_target" not in toml_text(spec)  # SFT: no RL fields
