"""A crashed, hung, NaN, incomplete or step-less framework run is an error (exit 2), never a pass; synthetic numeric
faults are divergences (exit 1) with the right signature. Uses the `faults` self-test adapter."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


def run_faults(tmp_path: Path, mode: str, timeout_s: float = 120, extra: str = "") -> tuple[int, dict, str]:
    case = tmp_path / f"{mode}.toml"
    case.write_text(f'[case]\nname = "faults-{mode}"\nframeworks = ["faults"]\n[batch]\ngrad_accum = 3\n'
                    f"[run]\ntimeout_s = {timeout_s}\n[faults]\nmode = \"{mode}\"\n{extra}")
    report = tmp_path / f"{mode}.json"
    out = subprocess.run([sys.executable, "-m", "stepdiff", "run", str(case), "--json", str(report)],
                         capture_output=True, text=True, timeout=600)
    return out.returncode, json.loads(report.read_text()), out.stdout


@pytest.mark.parametrize(
    ("mode", "needle"),
    [
        ("crash", "exited with code 3"),
        ("exception", "simulated framework exception"),
        ("nan", "contains NaN/Inf"),
        ("missing", "gradient missing"),
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


def test_hang_is_stopped_by_timeout(tmp_path: Path) -> None:
    t0 = time.monotonic()
    code, report, _ = run_faults(tmp_path, "hang", timeout_s=5)
    assert code == 2
    assert "timed out after 5 s" in report["runs"][0]["reason"]
    assert time.monotonic() - t0 < 120


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
