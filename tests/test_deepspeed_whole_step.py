"""DeepSpeed's whole training step under test: its own optimizer (built from the config's `optimizer` block), its
precision wrappers and clipping, updates and optimizer state checked every step, and four more real-release negative
controls, each caught and named from the numbers, each fixed release clean:

- ZeRO-2 + CPU offload, gradient_accumulation_steps = 1, several backward() calls per step with
  set_gradient_accumulation_boundary: only the last backward kept (<= 0.18.9; fixed 0.19.0, PR #7981);
- BF16_Optimizer (ZeRO-1, bf16, grad_accum_dtype fp32, world size 2): the boundary micro-batch added after the
  data-parallel all-reduce (0.18.3-0.18.9; fixed 0.19.0, PR #7985);
- ZeRO-0 + bf16: gradients divided by a loss scale never applied to the loss, and not zeroed between steps (0.18.3-
  0.18.5 by DeepSpeed's source, measured here on 0.18.5; fixed 0.18.6, PR #7839);
- clip_grad_norm_ with max instead of min (0.13.2; fixed 0.13.3, PR #5150), on torch 2.13 through the adapter's
  stand-ins for the Intel packages 0.13's CPU accelerator imports.
The default suite runs each against the newest cached fixed release where the fix holds; the exact fixed releases
the issue names (0.19.0) and the 0.13 pair run as `slow`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stepdiff.harness import spec as S
from stepdiff.harness.runner import run_case

pytestmark = pytest.mark.framework

BUGGY, FIXED = "deepspeed==0.18.9", "deepspeed==0.19.8"


def spec_of(**raw: Any) -> S.Spec:
    base: dict[str, Any] = {"case": {"name": "ds-whole-step"}, "optimizer": {"name": "sgd", "lr": 0.1}}
    for k, v in raw.items():
        base[k] = {**base.get(k, {}), **v}
    return S.from_dict(base)


def by_label(result: Any) -> dict[str, Any]:
    return {r.label: r for r in result.runs}


# the buggy release's side is slow: its CPU Adam compiles for ~2 min in a fresh environment (the default suite's
# budget); the update check's negative controls in the default suite are tests/test_optimizer.py's mutants
@pytest.mark.parametrize("pins", [pytest.param([FIXED], id="fixed"),
                                  pytest.param([FIXED, BUGGY], id="fixed-and-buggy", marks=pytest.mark.slow)])
def test_multistep_adamw_through_deepspeeds_own_cpu_adam(tmp_path: Path, pins: list[str]) -> None:
    """ZeRO-2 + CPU offload, GA 4, 3 AdamW steps (non-default betas, eps, decay with an excluded group, clipping that
    acts): DeepSpeed builds DeepSpeedCPUAdam itself; gradients, updates and Adam's state agree step after step on
    the fixed release; the buggy release diverges at step 0 (its dropped micro-batches)."""
    spec = spec_of(batch={"grad_accum": 4, "steps": 3},
                   optimizer={"name": "adamw", "lr": 1e-3, "betas": [0.8, 0.95], "eps": 1e-5, "weight_decay": 0.1,
                              "no_decay": ["norm"], "clip_grad_norm": 1.0},
                   deepspeed={"zero_stage": 2, "offload_optimizer": "cpu"})
    result = run_case(spec, pins, workdir=tmp_path)
    fixed = by_label(result)[FIXED]
    assert fixed.verdict == "agree", fixed.reason
    assert "DeepSpeedCPUAdam" in fixed.meta["optimizer"] and "config's optimizer block" in fixed.meta["optimizer"]
    assert fixed.compared["loss"].startswith("not compared")  # the loss the adapter feeds in is no evidence
    assert result.bound.update_bound() <= 1e-3
    for st in fixed.steps:
        assert st.update.total.rel < 1e-5 and st.grad.total.rel < 1e-5
        assert set(st.state) == {"exp_avg", "exp_avg_sq"} and st.state["exp_avg_sq"].total.rel < 1e-5
        assert st.opt_step == st.opt_step_ref == st.step + 1
    if BUGGY in pins:
        bug = by_label(result)[BUGGY]
        assert bug.verdict == "diverge" and bug.first_diverging_step == 0
        assert bug.signature is not None and bug.signature.name == "dropped-microbatches"


def test_handed_in_torch_optimizer_is_an_explicit_knob(tmp_path: Path) -> None:
    spec = spec_of(batch={"grad_accum": 2, "steps": 2},
                   deepspeed={"zero_stage": 2, "optimizer_source": "torch"})
    run = run_case(spec, [FIXED], workdir=tmp_path).runs[0]
    assert run.verdict == "agree", run.reason
    assert "handed to deepspeed.initialize by the adapter" in run.meta["optimizer"]
    assert "torch optimizer handed in from outside" in run.meta["code_path"]


@pytest.mark.parametrize("fixed", [FIXED, pytest.param("deepspeed==0.19.0", marks=pytest.mark.slow)])
def test_backward_calls_per_step_keep_only_the_last(tmp_path: Path, fixed: str) -> None:
    spec = spec_of(batch={"grad_accum": 3, "steps": 2},
                   deepspeed={"zero_stage": 2, "offload_optimizer": "cpu", "accumulation": "boundary-calls"})
    result = run_case(spec, [BUGGY, fixed], workdir=tmp_path)
    bug, ok = by_label(result)[BUGGY], by_label(result)[fixed]
    assert bug.verdict == "diverge" and bug.signature is not None
    assert bug.signature.name == "dropped-microbatches"
    assert list(bug.fit.weights) == pytest.approx([0, 0, 1], abs=1e-4)
    assert bug.meta["extra"]["ds_config"]["gradient_accumulation_steps"] == 1
    assert ok.verdict == "agree", ok.reason


@pytest.mark.parametrize("fixed", [FIXED, pytest.param("deepspeed==0.19.0", marks=pytest.mark.slow)])
def test_bf16_optimizer_boundary_microbatch_after_allreduce(tmp_path: Path, fixed: str) -> None:
    spec = spec_of(model={"dtype": "bfloat16"}, batch={"grad_accum": 2, "world_size": 2, "steps": 2},
                   deepspeed={"zero_stage": 1, "grad_accum_dtype": "fp32"})
    result = run_case(spec, [BUGGY, fixed], workdir=tmp_path)
    bug, ok = by_label(result)[BUGGY], by_label(result)[fixed]
    assert "BF16_Optimizer" in bug.meta["optimizer"]
    assert bug.verdict == "diverge" and bug.signature is not None
    assert bug.signature.name == "rank-local-boundary-microbatch", bug.signature
    assert "[1, 0, 1, 2]" in bug.signature.text and "[1, 2, 1, 0]" in bug.signature.text
    assert ok.verdict == "agree", ok.reason
    assert ok.max_rel_grad_error < result.bound.value / 3  # a clean bf16 run sits well inside its bound


@pytest.mark.slow  # two more environments (0.18.5, 0.18.6) for the default suite's budget
def test_zero0_bf16_loss_scale_and_carried_gradients(tmp_path: Path) -> None:
    spec = spec_of(model={"dtype": "bfloat16"}, batch={"grad_accum": 2, "steps": 3}, deepspeed={"zero_stage": 0})
    result = run_case(spec, ["deepspeed==0.18.5", "deepspeed==0.18.6"], workdir=tmp_path)
    bug, ok = by_label(result)["deepspeed==0.18.5"], by_label(result)["deepspeed==0.18.6"]
    assert bug.verdict == "diverge" and bug.first_diverging_step == 0
    assert bug.signature is not None and bug.signature.name == "update-only:loss-scale-not-undone+grads-carried"
    assert bug.steps[0].kinds == ("update",)  # step 0's gradient is right; the optimizer gets it / 65536
    assert any(abs((s.carried or 0) - 1) < 1e-2 for s in bug.steps[1:])
    assert ok.verdict == "agree", ok.reason
    assert ok.meta["param_dtype"] == "float32"  # bf16 updates checked on DeepSpeed's float32 master weights
    assert all(s.update.total.rel < 1e-6 for s in ok.steps)


@pytest.mark.slow  # two more environments, and 0.13 runs only through the INTEL_STAND_INS patch
def test_clip_grad_norm_max_instead_of_min(tmp_path: Path) -> None:
    spec = spec_of(batch={"grad_accum": 2, "steps": 3}, optimizer={"clip_grad_norm": 2.0},
                   deepspeed={"zero_stage": 0})
    result = run_case(spec, ["deepspeed==0.13.2", "deepspeed==0.13.3"], workdir=tmp_path)
    bug, ok = by_label(result)["deepspeed==0.13.2"], by_label(result)["deepspeed==0.13.3"]
    assert bug.verdict == "diverge" and bug.signature is not None
    assert bug.signature.name == "update-only:clip-max-instead-of-min", bug.signature
    assert ok.verdict == "agree", ok.reason
    assert any("intel_extension_for_pytorch" in p for p in bug.meta["patches"])
