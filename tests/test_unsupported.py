"""No silent approximation: a knob a release cannot take is `unsupported` (exit 4) with the reason, never a warning
and never a run of something else; a release whose dependency pins cannot be read is an error (one line, exit 3),
never an unpinned install. One group of tests per adapter, plus the worker-to-verdict path end to end.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stepdiff.adapters.base import ReleaseLookupError, Unsupported, WorkerContext
from stepdiff.adapters.common import config_kwargs
from stepdiff.harness import spec as S
from stepdiff.harness.cli import resolve_case


def stepdiff_run(case: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    report = case.with_suffix(".json")
    out = subprocess.run([sys.executable, "-m", "stepdiff", "run", str(case), "--json", str(report), *args],
                         capture_output=True, text=True, timeout=600)
    return out.returncode, json.loads(report.read_text()) if report.exists() else {}, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------------------------
# The worker-side path: an adapter raising Unsupported inside its worker is the `unsupported` verdict, exit 4


def test_unsupported_inside_the_worker_is_exit_4_with_the_reason(tmp_path: Path) -> None:
    case = tmp_path / "u.toml"
    case.write_text('[case]\nname = "u"\nframeworks = ["faults"]\n[faults]\nmode = "unsupported"\n')
    code, report, out = stepdiff_run(case)
    assert code == 4, out
    run = report["runs"][0]
    assert run["verdict"] == "unsupported" and "simulated knob this release cannot take" in run["reason"]
    assert "UNSUPPORTED" in out


def test_config_kwargs_refuses_an_absent_field_and_records_a_harmless_one() -> None:
    @dataclasses.dataclass
    class Cfg:
        lr: float = 0.1

    absent: dict[str, str] = {}
    table = {"padding_free": (False, "no padding-free batching in this release")}
    assert config_kwargs(Cfg, {"lr": 1.0, "padding_free": False}, table, absent) == {"lr": 1.0}
    assert absent == {"Cfg.padding_free": "no padding-free batching in this release"}
    with pytest.raises(Unsupported, match="no field 'padding_free' \\(wanted True\\)"):  # on: not harmless
        config_kwargs(Cfg, {"lr": 1.0, "padding_free": True}, table, {})
    with pytest.raises(Unsupported, match="no field 'momentum'"):  # not in the table at all
        config_kwargs(Cfg, {"lr": 1.0, "momentum": 0.9}, table, {})


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed: what the engine cannot run is refused on the host, before any environment is built


def test_deepspeed_unsupported_stage_before_any_install(tmp_path: Path) -> None:
    case = tmp_path / "ds.toml"
    case.write_text('[case]\nname = "ds"\nframeworks = ["deepspeed==0.0.0"]\n[deepspeed]\nzero_stage = 4\n')
    code, report, out = stepdiff_run(case)
    assert code == 4, out  # a usage error (3) would mean it tried to install the non-existent release
    assert "stages 0-3" in report["runs"][0]["reason"]


# ---------------------------------------------------------------------------------------------------------------
# TRL: every config field the adapter asks for exists in the release, or is harmless to lack (then recorded)


def _ctx(tmp_path: Path, world_size: int = 1) -> WorkerContext:
    return WorkerContext(rank=0, world_size=world_size, local_rank=0, device="cpu", scratch=tmp_path)


def test_trl_absent_table_only_covers_off_values(tmp_path: Path) -> None:
    """Each field TRL's adapter may find absent is requested at exactly its "off" value, for every trainer."""
    from stepdiff.adapters.trl import dpo, grpo, sft
    from stepdiff.adapters.trl.common import ABSENT_OK

    requests = {
        "sft": sft.config_request(S.load(resolve_case("trl-sft-ga3")), _ctx(tmp_path), _knobs("trl"), object, True),
        "sft (trl < 0.19)": sft.config_request(S.load(resolve_case("trl-sft-ga3")), _ctx(tmp_path), _knobs("trl"),
                                               object, False),
        "dpo": dpo.config_request(S.load(resolve_case("trl-dpo")), _ctx(tmp_path), _knobs("trl"), object),
        "grpo": grpo.config_request(S.load(resolve_case("trl-grpo-dapo-truncated")), _ctx(tmp_path), _knobs("trl"),
                                    object),
    }
    # set on purpose, so a release without them is refused (config_kwargs checks the value too): the old SFT path
    # needs max_seq_length = 1e6 (no truncation); GRPO's completion horizon is the spec's
    needed = {("sft (trl < 0.19)", "max_seq_length"), ("grpo", "max_completion_length")}
    for trainer, wanted in requests.items():
        for name, (off, _why) in ABSENT_OK.items():
            if name in wanted and (trainer, name) not in needed:
                assert wanted[name] == off, (trainer, name, wanted[name], off)
    with pytest.raises(Unsupported, match="max_seq_length"):
        from stepdiff.adapters.trl.common import trainer_config

        @dataclasses.dataclass
        class SFTConfigWithoutIt:
            learning_rate: float = 1e-3

        trainer_config(SFTConfigWithoutIt, {"max_seq_length": 10**6}, {})
    assert "completion_only_loss" not in requests["sft (trl < 0.19)"]  # that path carries the mask in labels


def test_trl_release_without_a_needed_field_is_unsupported() -> None:
    from stepdiff.adapters.trl.common import trainer_config

    @dataclasses.dataclass
    class OldSFTConfig:  # a release whose config lacks the completion mask switch
        learning_rate: float = 1e-3

    with pytest.raises(Unsupported, match="completion_only_loss"):
        trainer_config(OldSFTConfig, {"learning_rate": 0.5, "completion_only_loss": True}, {})
    absent: dict[str, str] = {}
    cfg, kwargs = trainer_config(OldSFTConfig, {"learning_rate": 0.5, "shuffle_dataset": False}, absent)
    assert cfg.learning_rate == 0.5 and kwargs == {"learning_rate": 0.5}
    assert list(absent) == ["OldSFTConfig.shuffle_dataset"]


def _knobs(adapter: str) -> Any:
    from stepdiff.harness.registry import knob_class

    cls = knob_class(adapter)
    assert cls is not None
    return cls()


# ---------------------------------------------------------------------------------------------------------------
# verl: the same rule for its config dataclasses


def test_verl_absent_field_is_unsupported_unless_harmless() -> None:
    from stepdiff.adapters.verl.common import config_kwargs as verl_config

    @dataclasses.dataclass
    class FSDPActorConfig:
        ppo_epochs: int = 1

    notes: list[str] = []
    assert verl_config(FSDPActorConfig, {"ppo_epochs": 1, "calculate_entropy": False}, notes) == {"ppo_epochs": 1}
    assert notes and "calculate_entropy" in notes[0]
    with pytest.raises(Unsupported, match="use_remove_padding"):
        verl_config(FSDPActorConfig, {"ppo_epochs": 1, "use_remove_padding": True}, [])


# ---------------------------------------------------------------------------------------------------------------
# OpenRLHF: pins read or refused; CLI options and the torch-Adam switch a release lacks are unsupported


def test_openrlhf_unreadable_release_pins_are_an_error_not_an_unpinned_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from stepdiff.adapters.openrlhf import env
    from stepdiff.harness import envs
    from stepdiff.harness.errors import EnvironmentBuildError

    def no_index(*a: Any, **k: Any) -> Any:
        raise subprocess.CalledProcessError(1, a[0], stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(env.subprocess, "run", no_index)
    env.release_pins.cache_clear()
    with pytest.raises(ReleaseLookupError, match="could not be read"):
        env.release_pins("0.0.42")
    with pytest.raises(EnvironmentBuildError, match="openrlhf==0.0.42: .*RELEASE_PINS"):
        envs.request_for("openrlhf", "0.0.42")
    env.release_pins.cache_clear()
    assert env.release_pins("0.10.2") == ("deepspeed==0.18.9", "transformers==5.5.4", "flash-attn==2.8.3")


def test_openrlhf_pins_from_wheel_metadata() -> None:
    from stepdiff.adapters.openrlhf.env import requires_dist

    meta = ("Name: openrlhf\nRequires-Dist: deepspeed==0.18.9\nRequires-Dist: transformers (==5.5.4)\n"
            "Requires-Dist: flash-attn==2.8.3; extra == 'gpu'\nRequires-Dist: peft\n")
    reqs = requires_dist(meta)
    assert reqs["deepspeed"] == "deepspeed==0.18.9" and reqs["transformers"] == "transformers==5.5.4"
    assert "flash-attn" not in reqs  # an extra's requirement is not the release's own pin


def test_openrlhf_cli_without_an_option_is_unsupported() -> None:
    import argparse

    from stepdiff.adapters.openrlhf.cli_args import build_argv

    flat = argparse.ArgumentParser()
    flat.add_argument("--learning_rate")  # a flat-spelling release: no --adam.eps
    assert build_argv(flat, {"lr": "0.1"}) == (["--learning_rate", "0.1"], "flat")
    with pytest.raises(Unsupported, match="no option for eps"):
        build_argv(flat, {"lr": "0.1", "eps": "1e-06"})


def test_openrlhf_torch_adam_on_a_release_that_builds_its_own_optimizer_is_unsupported() -> None:
    from stepdiff.adapters.openrlhf.recorder import Recorder

    rec = Recorder(S.from_dict({"case": {"name": "x"}}), grad_hooks=False, torch_adam=True)
    calls: list[dict[str, Any]] = []
    own_optimizer = {"train_batch_size": 4}  # <= 0.10.1: FusedAdam built by the strategy, passed as optimizer=
    with pytest.raises(Unsupported, match="adam_impl = 'torch'"):
        rec._initialize(lambda *a, **kw: calls.append(kw), model=None, optimizer=object(), config=own_optimizer)
    assert not calls  # DeepSpeed was never initialised with a setting it would ignore
    from_config = {"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1.0}}}
    rec = Recorder(S.from_dict({"case": {"name": "x"}}), grad_hooks=False, torch_adam=True)
    rec._initialize(lambda *a, **kw: calls.append(kw), model=None, config=from_config)
    assert calls[0]["config"]["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.slow
@pytest.mark.framework
def test_openrlhf_flat_cli_release_refuses_a_non_default_eps(tmp_path: Path) -> None:
    """End to end through a real release: openrlhf 0.10.1's CLI has no --adam.eps, so eps = 1e-6 is unsupported."""
    from stepdiff.harness.casefile import write_case

    spec = S.load(resolve_case("openrlhf-sft-mean-of-means")).replace(
        optimizer__eps=1e-6, openrlhf={"adam_impl": "deepspeed"}, case__frameworks=["openrlhf==0.10.1"])
    case = write_case(spec, tmp_path / "eps.toml")
    code, report, out = stepdiff_run(case)
    assert code == 4, out
    assert "no option for eps" in report["runs"][0]["reason"]
