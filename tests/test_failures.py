"""A crashed, hung, NaN, incomplete or step-less framework run is an error (exit 2), never a pass; synthetic numeric
faults are divergences (exit 1) with the right signature. Uses the `faults` self-test adapter."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


def faults_case(tmp_path: Path, mode: str, timeout_s: float = 120, extra: str = "", run: str = "",
                batch: str = "", name: str = "") -> Path:
    name = name or f"faults-{mode}"
    case = tmp_path / f"{name}.toml"
    case.write_text(f'[case]\nname = "{name}"\nframeworks = ["faults"]\n[batch]\ngrad_accum = 3\n{batch}'
                    f"[run]\ntimeout_s = {timeout_s}\n{run}[faults]\nmode = \"{mode}\"\n{extra}")
    return case


def run_faults(tmp_path: Path, mode: str, timeout_s: float = 120, extra: str = "", run: str = "",
               batch: str = "", *flags: str) -> tuple[int, dict, str]:
    case = faults_case(tmp_path, mode, timeout_s, extra, run, batch)
    report = tmp_path / f"{mode}.json"
    out = subprocess.run([sys.executable, "-m", "stepdiff", "run", str(case), "--json", str(report), *flags],
                         capture_output=True, text=True, timeout=600)
    return out.returncode, json.loads(report.read_text()), out.stdout


@pytest.mark.parametrize(
    ("mode", "needle"),
    [
        ("crash", "exited with code 3"),
        ("exception", "simulated framework exception"),
        ("nan", "contains NaN/Inf"),
        ("missing", "gradient missing"),
        ("zero-filled", "gradient missing for 1 parameters (exactly zero"),
        ("no-step", "the optimizer step did not happen"),
    ],
)
def test_broken_runs_are_errors(tmp_path: Path, mode: str, needle: str) -> None:
    code, report, stdout = run_faults(tmp_path, mode)
    assert code == 2
    assert report["verdict"] == "error" and report["runs"][0]["verdict"] == "error"
    assert needle in report["runs"][0]["reason"]
    if mode in ("crash", "exception"):
        assert "faults: simulated" in report["runs"][0]["log_tail"]  # the framework's own output is carried


def test_hang_is_stopped_by_the_framework_timeout_not_the_reference_one(tmp_path: Path) -> None:
    """run.timeout_s bounds the framework only: the reference keeps its own (default) limit and finishes, so the
    error really is the framework's hang."""
    t0 = time.monotonic()
    code, report, _ = run_faults(tmp_path, "hang", timeout_s=5)
    assert code == 2
    reason = report["runs"][0]["reason"]
    assert reason.startswith("faults run timed out after 5 s") and "raise run.timeout_s" in reason, reason
    assert report["reference_self_error"] is not None  # the reference ran (and calibrated) to the end
    assert time.monotonic() - t0 < 120


def test_reference_timeout_is_its_own_and_reported_as_the_reference(tmp_path: Path) -> None:
    # --no-cache: the reference must really run (a cached reference result never times out)
    code, report, _ = run_faults(tmp_path, "none", 600, "", "reference_timeout_s = 1\n", "", "--no-cache")
    assert code == 2
    reason = report["runs"][0]["reason"]
    assert reason.startswith("reference failed: the reference run timed out after 1 s"), reason
    assert "raise run.reference_timeout_s" in reason


def test_a_failure_on_rank_1_reaches_the_verdict(tmp_path: Path) -> None:
    """Rank 0 succeeds and writes its record; rank 1 raises. The run is an error naming rank 1 (rank 0's success
    used to overwrite rank 1's failure: a pass)."""
    code, report, _ = run_faults(tmp_path, "exception", batch="world_size = 2\n", extra="rank = 1\n")
    assert code == 2
    reason = report["runs"][0]["reason"]
    assert "rank 1: RuntimeError: faults: simulated framework exception" in reason, reason
    assert "rank 0" not in reason  # rank 0 did not fail


@pytest.mark.slow  # a 60 s timeout by design; the rank-1 exception test covers the path in the default suite
def test_a_hang_on_rank_1_is_a_timeout_naming_it(tmp_path: Path) -> None:
    # the limit includes torchrun's start-up and rank 0's whole run: generous, so rank 0 surely answered
    code, report, _ = run_faults(tmp_path, "hang", timeout_s=60, batch="world_size = 2\n", extra="rank = 1\n")
    assert code == 2
    reason = report["runs"][0]["reason"]
    assert "timed out after 60 s (ranks 1 never answered)" in reason, reason


def test_exit_code_of_several_cases_is_the_worst_verdict(tmp_path: Path) -> None:
    """error > diverge > unsupported > agree across cases (a numeric max let "unsupported" (4) hide the others)."""
    unsupported = faults_case(tmp_path, "none", name="unsupported", extra="", run="")
    unsupported.write_text(unsupported.read_text().replace("[batch]", '[model]\ndtype = "float64"\n[batch]'))
    diverge = faults_case(tmp_path, "scale", name="diverge", extra="scale = 0.5\n")
    error = faults_case(tmp_path, "exception", name="error")
    expected = {(unsupported,): 4, (unsupported, diverge): 1, (unsupported, error): 2}
    for cases, code in expected.items():
        report = tmp_path / "several.json"
        out = subprocess.run([sys.executable, "-m", "stepdiff", "run", *map(str, cases), "--json", str(report)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == code, (cases, out.stderr[-2000:])
        doc = json.loads(report.read_text())
        assert doc["exit_code"] == code
        last = out.stdout.strip().splitlines()[-1]
        if len(cases) > 1:
            assert last == f"overall: {doc['verdict']} over {len(cases)} cases (exit {code})", last
        else:
            assert f"(exit {code})" in last


def test_synthetic_faults_are_divergences_with_shape(tmp_path: Path) -> None:
    code, report, stdout = run_faults(tmp_path, "drop")
    assert code == 1
    run = report["runs"][0]
    assert run["verdict"] == "diverge" and run["signature"] == "dropped-microbatches"
    assert run["microbatch_weights"] == pytest.approx([1, 0, 1], abs=1e-3)
    code, report, _ = run_faults(tmp_path, "scale", extra="scale = 0.5\n")
    assert code == 1
    run = report["runs"][0]
    assert run["signature"] == "uniform-scale"
    assert run["microbatch_weights"] == pytest.approx([0.5] * 3, abs=1e-3)
    code, report, _ = run_faults(tmp_path, "none")
    assert code == 0 and report["runs"][0]["max_rel_grad_error"] == 0.0


def test_token_fit_names_a_mask_off_by_one_end_to_end(tmp_path: Path) -> None:
    """A framework whose loss mask misses the first response token: the micro-batch fit cannot see it (its residual
    is large), the token-level fit names it."""
    code, report, stdout = run_faults(tmp_path, "mask-first")
    assert code == 1
    run = report["runs"][0]
    assert run["signature"] == "unexplained"
    assert run["token_signature"] == "token-mask"
    assert run["token_signature_text"] == "first response token never trained"
    assert run["token_fit_residual"] < 1e-5


def test_kept_directory_is_not_answered_by_a_previous_run(tmp_path: Path) -> None:
    """Regression: with --keep, a second run's worker read the first run's stale result file."""
    keep = tmp_path / "keep"
    for mode, expected in (("exception", 2), ("none", 0)):
        case = tmp_path / "same.toml"
        case.write_text(f'[case]\nname = "same"\nframeworks = ["faults"]\n[faults]\nmode = "{mode}"\n')
        out = subprocess.run([sys.executable, "-m", "stepdiff", "run", str(case), "--keep", str(keep)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == expected, out.stdout[-2000:]


def test_read_outs_leave_out_a_missing_gradient_never_zero_fill_it() -> None:
    """verl's FSDP and TRL's module read-outs used to write zeros for a parameter without .grad (a divergence, exit
    1, instead of a missing gradient, exit 2)."""
    import torch

    from stepdiff.adapters.readouts import module_grads

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0](torch.ones(1, 3)).sum().backward()  # the second layer gets no gradient
    grads = module_grads(model)
    assert set(grads) == {"0.weight", "0.bias"}


def test_a_missing_gradient_is_an_error_unless_the_correct_one_is_zero() -> None:
    import torch

    from stepdiff.harness import spec as S
    from stepdiff.harness.compare import validate_record
    from stepdiff.harness.errors import WorkerError
    from stepdiff.harness.record import Record, RecordMeta, StepRecord

    spec = S.from_dict({"case": {"name": "r"}})
    ref_grads = {"a": torch.ones(2), "b": torch.zeros(2)}
    ref = Record(RecordMeta("reference", "-", "-", "-", "cpu", 1, "float32"),
                 [StepRecord(1.0, None, ref_grads, {"a": torch.ones(2), "b": torch.ones(2)})])

    def rec(grads: dict) -> Record:
        return Record(RecordMeta("x", "1", "-", "-", "cpu", 1, "float32"),
                      [StepRecord(1.0, None, grads, {"a": torch.ones(2), "b": torch.ones(2)})])

    validate_record(spec, rec({"a": torch.ones(2)}), ref)  # b's correct gradient is zero: no gradient is right
    with pytest.raises(WorkerError, match="gradient missing for 1 parameters, e.g. a"):
        validate_record(spec, rec({"b": torch.zeros(2)}), ref)
    with pytest.raises(WorkerError, match=r"exactly zero in every element.*e\.g\. a"):
        validate_record(spec, rec({"a": torch.zeros(2), "b": torch.zeros(2)}), ref)
    with pytest.raises(WorkerError, match="the reference's model does not have, e.g. 'c'"):
        validate_record(spec, rec({"a": torch.ones(2), "b": torch.zeros(2), "c": torch.ones(1)}), ref)


@pytest.mark.parametrize(("zero_stage", "clip", "expected"), [(2, 0.0, 0.0), (0, 1.0, 0.0), (0, 0.0, None)])
def test_openrlhf_reported_grad_norm_of_zero_is_a_number(zero_stage: int, clip: float, expected: float | None
                                                         ) -> None:
    """OpenRLHF logs 0 for a norm it did not compute only with ZeRO-0 and no clipping; elsewhere 0 is a report."""
    from stepdiff.adapters.base import WorkerContext
    from stepdiff.adapters.openrlhf.recorder import Recorder
    from stepdiff.harness import spec as S

    spec = S.from_dict({"case": {"name": "o"}, "openrlhf": {"zero_stage": zero_stage},
                        "optimizer": {"clip_grad_norm": clip}})
    r = Recorder(spec, grad_hooks=True)
    r.logs = [{"loss_mean": 1.5, "grad_norm": 0.0}]
    ctx = WorkerContext(rank=0, world_size=1, local_rank=0, device="cpu", scratch=Path("."))
    losses, norms, _ = r.step_scalars(ctx)
    assert losses == [1.5] and norms == [expected]
