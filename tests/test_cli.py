"""The command line: exit codes, one-line usage errors, no framework imported by `import stepdiff`, --help or list."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FRAMEWORKS = ("torch", "deepspeed", "transformers", "trl", "verl", "openrlhf", "accelerate")


def stepdiff(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stepdiff", *args], capture_output=True, text=True, timeout=timeout)


def imported_frameworks(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & set({FRAMEWORKS!r})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1].replace("'", '"'))


def test_import_and_help_import_no_framework() -> None:
    assert imported_frameworks("import stepdiff") == []
    assert imported_frameworks("from stepdiff.harness.cli import build_parser; build_parser().format_help()") == []
    assert imported_frameworks("import stepdiff.harness.spec as s; s.load('cases/deepspeed-zero2-offload-ga4.toml')"
                               ) == []


def test_list_imports_no_framework_and_shows_patches() -> None:
    code = ("import contextlib, io\nfrom stepdiff.harness.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['list', '--json'])")
    assert set(imported_frameworks(code)) <= {"torch"}  # adapter modules may import torch, never their framework
    out = stepdiff("list", "--json")
    assert out.returncode == 0
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    ds = rows["deepspeed"]
    assert "deepspeed.initialize" in ds["runs"]
    assert any("build_shm_op" in p["target"] for p in ds["patches"])
    assert ds["knob_defaults"]["zero_stage"] == 2


def test_version_and_module_entry() -> None:
    out = stepdiff("--version")
    assert out.returncode == 0 and out.stdout.startswith("stepdiff ")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "no-such-case"], "no such file and no bundled case"),
        (["run", "deepspeed-zero2-offload-ga4", "-f", "notaframework==1.0"], "unknown framework 'notaframework'"),
        (["run", "deepspeed-zero2-offload-ga4", "-f", "deepspeed=="], "expected NAME==VERSION"),
        (["run", "deepspeed-zero2-offload-ga4", "-f", "deepspeed==0.0.0.424242"], "could not be installed"),
    ],
)
def test_usage_errors_exit_3_with_one_line(args: list[str], needle: str) -> None:
    out = stepdiff(*args)
    assert out.returncode == 3, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("stepdiff: error:")]
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_bad_case_file_exit_3(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[case]\nframeworks = ["faults"]\n[batch]\ngrad_accum = 0\n')
    out = stepdiff("run", str(p))
    assert out.returncode == 3
    assert "batch.grad_accum = 0: must be >= 1; fix: set batch.grad_accum to 1 or more" in out.stderr


def test_cases_and_spec_help() -> None:
    out = stepdiff("cases")
    assert "deepspeed-zero2-offload-ga4" in out.stdout
    out = stepdiff("spec-help")
    assert "batch.grad_accum" in out.stdout and "optimizer.clip_grad_norm" in out.stdout
