"""The GPU path, for real: CUDA devices, nccl, real-size model shapes. Run with `python -m pytest -m gpu` on a machine
with a CUDA GPU; skipped without one. Framework environments come from the index, or from a wheelhouse when
STEPDIFF_WHEELHOUSE is set (air-gapped clusters: see README)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from stepdiff.harness import sketch
from stepdiff.harness import spec as S
from stepdiff.harness.cli import resolve_case
from stepdiff.harness.model import parameter_shapes
from stepdiff.harness.runner import CaseResult, run_case
from stepdiff.reports import json_report, terminal

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only test)")]


def _bundled(name: str, **changes: object) -> S.Spec:
    return S.load(resolve_case(name)).replace(run__device="cuda", **changes)


def _show(res: CaseResult, name: str) -> None:
    """The terminal report on stdout (`pytest -s` shows it), and the JSON report under $STEPDIFF_GPU_OUT if set."""
    print("\n" + terminal.render(res), flush=True)
    out = os.environ.get("STEPDIFF_GPU_OUT")
    if out:
        json_report.write([res], Path(out) / f"{name}.json")


def test_reference_and_self_test_on_cuda_catch_a_dropped_microbatch(tmp_path: Path) -> None:
    """Reference and the faults self-test on the GPU: a correct run agrees, a dropped micro-batch is named."""
    spec = _bundled("deepspeed-zero2-offload-ga4")
    ok = run_case(spec, ["faults"], workdir=tmp_path / "ok")
    assert ok.runs[0].verdict == "agree", ok.runs[0].reason
    assert ok.runs[0].meta is not None and ok.runs[0].meta["device"] == "cuda"
    assert ok.runs[0].meta["extra"]["tf32_matmul"] is False
    bad = run_case(spec.replace(faults__mode="drop", faults__drop=2), ["faults"], workdir=tmp_path / "bad")
    _show(bad, "faults-drop-cuda")
    run = bad.runs[0]
    assert run.verdict == "diverge" and run.signature is not None and run.signature.name == "dropped-microbatches"
    assert run.fit is not None and [round(w, 2) for w in run.fit.weights] == [1.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("preset", ["llama-160m", "llama-0.5b"])
def test_deepspeed_offload_bug_at_real_size_on_cuda(tmp_path: Path, preset: str) -> None:
    """The bundled DeepSpeed case at real size on the GPU: 0.18.9 drops the middle micro-batches, 0.19.8 agrees;
    the reference's contributions are sketched (2.6 GB and 7.5 GB in full), peak GPU memory is recorded."""
    spec = _bundled("deepspeed-zero2-offload-ga4", model__preset=preset)
    res = run_case(spec, ["deepspeed==0.18.9", "deepspeed==0.19.8"], workdir=tmp_path / "run")
    _show(res, f"ds-{preset}")
    buggy, fixed = res.runs
    assert buggy.verdict == "diverge", buggy.reason
    assert buggy.signature is not None and buggy.signature.name == "dropped-microbatches"
    assert buggy.fit is not None and [round(w, 2) for w in buggy.fit.weights] == [1.0, 0.0, 0.0, 1.0]
    assert fixed.verdict == "agree", fixed.reason
    assert fixed.max_rel_grad_error is not None and fixed.max_rel_grad_error < res.bound.value
    for r in (buggy, fixed):
        assert r.meta is not None and r.meta["device"] == "cuda"
        assert r.meta["extra"]["peak_gpu_memory_gib"] > 0.5  # 160M fp32 parameters and gradients live on the GPU
    n_params = sum(math.prod(s) for s in parameter_shapes(spec).values())
    assert sketch.fraction_for(n_params, 4) is not None  # the fit above ran on sketched contributions


def test_four_frameworks_agree_at_real_size_on_cuda(tmp_path: Path) -> None:
    """One SFT step at llama-160m through the fixed releases of all four frameworks on the GPU: all agree."""
    spec = _bundled("sft-four-frameworks", model__preset="llama-160m")
    pins = ["deepspeed==0.19.8", "openrlhf==0.11.2", "trl==1.16.0", "verl==0.9.1"]
    res = run_case(spec, pins, workdir=tmp_path / "run")
    _show(res, "four-llama-160m")
    for r in res.runs:
        assert r.verdict == "agree", f"{r.label}: {r.verdict}: {r.reason}\n{r.log_tail}"
