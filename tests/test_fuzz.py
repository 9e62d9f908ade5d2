"""Fuzzing and metamorphic properties against real framework releases: the buggy release is caught and shrunk to the
configuration that shows it, written as a case `stepdiff run` reproduces; the fixed release finds nothing at the same
budget. The default suite keeps one small campaign per side; the full campaigns, every property's real-release
negative control and the release bisect are `slow`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stepdiff.harness import spec as S
from stepdiff.harness import strategies as ST
from stepdiff.harness.cli import resolve_case
from stepdiff.harness.fuzz import Campaign, fuzz
from stepdiff.harness.runner import parse_pin

pytestmark = pytest.mark.framework

OFFLOAD = "deepspeed-zero2-offload-ga4"


def campaign(case: str, pin: str, tmp_path: Path, **kw: Any) -> Campaign:
    kw.setdefault("database", None)
    return fuzz(S.load(resolve_case(case)), parse_pin(pin), workdir=tmp_path / pin.replace("==", "-"),
                save_case=tmp_path / f"{pin.replace('==', '-')}.toml", **kw)


def test_fuzz_finds_and_shrinks_the_offload_bug(tmp_path: Path) -> None:
    small: dict[str, Any] = {"vary": ["batch.grad_accum", "data.samples"], "examples": 5}
    found = campaign(OFFLOAD, "deepspeed==0.18.9", tmp_path, **small)
    assert found.failing is not None and found.failing.verdict == "diverge"
    saved = S.load(found.saved_case)
    assert saved.batch.grad_accum == 3 and saved.batch.micro_batch_size == 1  # GA <= 2 cannot show it
    assert found.result is not None and found.result.signature.name == "dropped-microbatches"
    assert list(found.result.fit.weights) == pytest.approx([1, 0, 1], abs=1e-4)
    assert found.reproduced == "diverge (dropped-microbatches)"  # `stepdiff run` on the written file
    report = json.loads(found.saved_report.read_text())
    assert report["runs"][0]["signature"] == "dropped-microbatches"
    doc = found.to_json()
    assert len(doc["examples"]) == len(found.examples) and doc["failing"]["changed_from_base"]["batch.grad_accum"] == 3
    assert all("max_rel_error" in e and "config" in e for e in doc["examples"])
    clean = campaign(OFFLOAD, "deepspeed==0.19.8", tmp_path, **small)
    assert clean.failing is None and clean.runs == 5 and all(e.verdict == "agree" for e in clean.examples)
    assert max(e.config["batch.grad_accum"] for e in clean.examples) >= 3  # the fixed release saw GA >= 3 too


@pytest.mark.slow
def test_done_when_deepspeed_default_strategy(tmp_path: Path) -> None:
    """The default strategy (every dimension) at the ci profile's budget."""
    found = campaign(OFFLOAD, "deepspeed==0.18.9", tmp_path)
    assert found.failing is not None
    saved = S.load(found.saved_case)
    assert saved.batch.grad_accum == 3 and saved.knobs_for("deepspeed").offload_optimizer == "cpu"
    assert found.reproduced is not None and found.reproduced.startswith("diverge (dropped-microbatches")
    clean = campaign(OFFLOAD, "deepspeed==0.19.8", tmp_path)
    assert clean.failing is None and clean.runs >= 15, clean.counts()  # 20 draws, a few duplicates or unsupported


@pytest.mark.slow
def test_done_when_openrlhf_mean_of_means(tmp_path: Path) -> None:
    base = "openrlhf-sft-mean-of-means"
    kw: dict[str, Any] = {}  # the default strategy at the ci profile's budget
    found = campaign(base, "openrlhf==0.10.2", tmp_path, **kw)
    assert found.failing is not None and found.result is not None
    saved = S.load(found.saved_case)
    assert (saved.batch.world_size, saved.batch.grad_accum) == (1, 2)
    from stepdiff.harness import data as D

    counts = D.microbatch_token_counts(saved, 0)[0]
    assert len(counts) == 2 and counts[0] != counts[1]  # two micro-batches of unequal supervised-token counts
    assert found.result.signature.name == "microbatch-token-mean"
    clean = campaign(base, "openrlhf==0.11.2", tmp_path, **kw)
    assert clean.failing is None and clean.runs >= 15, clean.counts()


# ---------------------------------------------------------------------------------------------------------------
# Every metamorphic property: a real buggy release breaks it, its fixed release holds it (faults controls for
# zero_lr and padding, which no known release breaks, are in test_properties.py).

PROPERTY_CONTROLS = [
    ("ga_invariance", OFFLOAD, "deepspeed==0.18.9", "deepspeed==0.19.8", ["data.samples"]),
    ("permutation", OFFLOAD, "deepspeed==0.18.9", "deepspeed==0.19.8", ["data.samples"]),
    ("duplicate", OFFLOAD, "deepspeed==0.18.9", "deepspeed==0.19.8", ["data.samples"]),
    ("noop", OFFLOAD, "deepspeed==0.18.9", "deepspeed==0.19.8", ["deepspeed.offload_optimizer", "data.samples"]),
    ("dp_equals_ga", "openrlhf-sft-mean-of-means", "openrlhf==0.10.3", "openrlhf==0.11.2", ["data.samples"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("prop", "case", "bad", "good", "vary"), PROPERTY_CONTROLS,
                         ids=[c[0] for c in PROPERTY_CONTROLS])
def test_property_real_release_negative_control(tmp_path: Path, prop: str, case: str, bad: str, good: str,
                                                vary: list[str]) -> None:
    kw: dict[str, Any] = {"prop": prop, "vary": vary, "examples": 4, "limits": ST.Limits(max_steps=1)}
    caught = campaign(case, bad, tmp_path, **kw)
    assert caught.failing is not None and caught.failing.verdict == "violated", caught.counts()
    assert caught.reproduced is not None and caught.reproduced.startswith("diverge")
    clean = campaign(case, good, tmp_path, **kw)
    assert clean.failing is None and clean.runs == 4 and all(e.verdict == "hold" for e in clean.examples)


@pytest.mark.slow
@pytest.mark.parametrize("prop", ["zero_lr", "padding"])
def test_property_holds_on_a_real_release(tmp_path: Path, prop: str) -> None:
    clean = campaign(OFFLOAD, "deepspeed==0.19.8", tmp_path, prop=prop, examples=4,
                     vary=["data.samples", "batch.micro_batch_size", "deepspeed.zero_stage"])
    assert clean.failing is None and clean.runs == 4 and all(e.verdict == "hold" for e in clean.examples)


@pytest.mark.slow
def test_bisect_names_the_offload_bug_releases(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "stepdiff", "bisect", OFFLOAD, "deepspeed", "--from", "0.14.0",
                          "--to", "0.19.8", "--json", str(tmp_path / "b.json")], capture_output=True, text=True,
                         timeout=5400)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert (result["introduced"], result["last_good"]) == ("0.15.2", "0.15.1"), out.stdout
    assert (result["fixed"], result["last_bad"]) == ("0.19.0", "0.18.9"), out.stdout
    assert "introduced in 0.15.2 (last good 0.15.1)" in out.stdout and "fixed in 0.19.0" in out.stdout
