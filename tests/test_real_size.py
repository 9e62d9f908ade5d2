"""The machinery real-size models need, proven on the CPU with tiny models: sketched micro-batch contributions, the
float64 calibration on fewer layers, offline environments from a wheelhouse."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from stepdiff.harness import sketch
from stepdiff.harness import spec as S
from stepdiff.harness.model import parameter_shapes
from stepdiff.harness.runner import calibration_spec, run_case

CASE = """
[case]
name = "real-size-machinery"
[model]
vocab_size = 64
hidden_size = 32
intermediate_size = 64
num_layers = 3
num_heads = 4
num_kv_heads = 2
[data]
seed = 7
prompt_len = [2, 6]
response_len = [2, 10]
[batch]
grad_accum = 4
[optimizer]
name = "sgd"
lr = 0.1
"""


BUDGET_2_LAYERS = str(800_000 / 2**30)
"""Float64 bytes for ~2.5 of the 3 layers (32 bytes per parameter for SGD)."""


def _spec(tmp_path: Path, extra: str = "") -> S.Spec:
    p = tmp_path / "case.toml"
    p.write_text(CASE + extra)
    return S.load(p)


@pytest.fixture
def forced_sketch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sketch even a tiny model, keeping about a fifth of its coordinates."""
    monkeypatch.setattr(sketch, "FULL_CONTRIBUTIONS_BYTES", 0)
    monkeypatch.setattr(sketch, "SKETCH_COORDINATES", 4000)


def test_sketched_fit_names_a_dropped_microbatch(tmp_path: Path, forced_sketch: None) -> None:
    spec = _spec(tmp_path, '\n[faults]\nmode = "drop"\ndrop = 2\n')
    res = run_case(spec, ["faults"], workdir=tmp_path / "run")
    run = res.runs[0]
    assert run.verdict == "diverge"
    assert run.fit is not None and run.signature is not None
    assert [round(w, 3) for w in run.fit.weights] == [1.0, 1.0, 0.0, 1.0]
    assert run.fit.residual < 1e-4
    assert run.signature.name == "dropped-microbatches"


def test_sketched_fit_says_correct_for_a_correct_run(tmp_path: Path, forced_sketch: None) -> None:
    res = run_case(_spec(tmp_path), ["faults"], workdir=tmp_path / "run")
    run = res.runs[0]
    assert run.verdict == "agree"
    assert run.fit is not None and run.signature is not None
    assert max(abs(w - 1.0) for w in run.fit.weights) < 1e-4
    assert run.signature.name == "correct"


def test_sketch_is_deterministic_and_keeps_the_requested_size() -> None:
    import torch

    t = torch.arange(100_000, dtype=torch.float32)
    a = sketch.sketch_one("w", t, 0.01)
    b = sketch.sketch_one("w", t.clone(), 0.01)
    assert a.numel() == 1000 and torch.equal(a, b)
    assert not torch.equal(a, sketch.sketch_one("other", t, 0.01))  # each parameter has its own sample
    assert sketch.fraction_for(10**9, 4) == pytest.approx(0.004)
    assert sketch.fraction_for(10**5, 4) is None


def test_fp64_calibration_on_fewer_layers_when_the_model_does_not_fit(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(tmp_path)
    n = sum(math.prod(s) for s in parameter_shapes(spec).values())  # 31,968: 4,128 outside the 3 layers of 9,280
    full, note = calibration_spec(spec, n)
    assert full is spec and note == ""
    monkeypatch.setenv("STEPDIFF_FP64_BUDGET_GB", BUDGET_2_LAYERS)
    small, note = calibration_spec(spec, n)
    assert small.model.num_layers == 2 and small.model.hidden_size == 32 and "2 of 3 layers" in note
    res = run_case(spec, ["faults"], workdir=tmp_path / "run")
    assert res.runs[0].verdict == "agree"
    assert "float64 calibration on the same shape with" in res.bound.source
    assert res.bound.reference_self_error is not None and res.bound.reference_self_error < 1e-5


def test_fp64_calibration_on_fewer_layers_still_catches_a_scaled_gradient(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPDIFF_FP64_BUDGET_GB", BUDGET_2_LAYERS)
    spec = _spec(tmp_path, '\n[faults]\nmode = "scale"\nscale = 1.01\n')
    res = run_case(spec, ["faults"], workdir=tmp_path / "run")
    assert "layers" in res.bound.source
    assert res.runs[0].verdict == "diverge"


@pytest.mark.slow
def test_offline_environment_from_a_wheelhouse(tmp_path: Path) -> None:
    """Gather DeepSpeed's wheels (what this host lacks), build its environment with no index, run the bundled case."""
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    (tmp_path / "have.txt").write_text(freeze)
    house = tmp_path / "wheels"
    cmd = [sys.executable, "-m", "stepdiff", "env", "wheelhouse", "deepspeed==0.19.8", "--dir", str(house),
           "--have", str(tmp_path / "have.txt")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert any(p.name.startswith("deepspeed-0.19.8-") for p in house.glob("*.whl"))
    assert not any(p.name.startswith("torch-") for p in house.glob("*.whl"))
    env = {"STEPDIFF_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PIP_NO_INDEX": "1"}
    run = subprocess.run([sys.executable, "-m", "stepdiff", "run", "deepspeed-zero2-offload-ga4", "-f",
                          "deepspeed==0.19.8", "--wheelhouse", str(house)], capture_output=True, text=True,
                         timeout=900, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "AGREE" in run.stdout
    info = next((tmp_path / "cache" / "envs").glob("*/env.json")).read_text()
    assert '"torch_source": "host-site-packages"' in info
