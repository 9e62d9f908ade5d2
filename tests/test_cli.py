"""The command line: exit codes, one-line usage errors, no framework imported by `import stepdiff`, --help or list."""

from __future__ import annotations

import contextlib
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
        (["run", "deepspeed-zero2-offload-ga4", "-f", "deepspeed=="], "no version after its operator"),
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


def test_argparse_errors_exit_3_with_one_line() -> None:
    for args in (["run"], ["run", "x", "--timeout", "nan"], ["run", "x", "--timeout", "-1"], ["nosuchverb"],
                 ["fuzz", "x", "--examples", "0"], ["run", "x", "--device", "tpu"]):
        out = stepdiff(*args)
        assert out.returncode == 3, (args, out.returncode, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stepdiff: error: "), (args, out.stderr)


def test_internal_error_has_its_own_code_one_line_and_traceback_only_with_debug(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from stepdiff.harness import cli
    from stepdiff.harness.outcome import EXIT_INTERNAL

    def broken(args: object) -> int:
        raise KeyError("a bug inside stepdiff")

    monkeypatch.setattr(cli, "cmd_cases", broken)
    assert EXIT_INTERNAL not in (0, 1, 2, 3, 4)
    assert cli.main(["cases"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("stepdiff: internal error: KeyError: 'a bug inside stepdiff' (at ")
    assert "tests/test_cli.py:" in lines[0] and "in broken, from harness/cli.py:" in lines[0], lines[0]
    assert "this is a bug in stepdiff" in lines[0] and "please report it" in lines[0] and "--debug" in lines[0]
    assert cli.main(["--debug", "cases"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
        "stepdiff: internal error: KeyError")
    assert cli.main(["cases", "--debug"]) == EXIT_INTERNAL  # --debug after the verb works too
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--junit", "--markdown"])
def test_output_paths_are_checked_before_any_work(tmp_path: Path, flag: str) -> None:
    """An unwritable report path is a usage error before the run starts (it used to fail after the whole run)."""
    case = tmp_path / "c.toml"
    case.write_text('[case]\nname = "c"\nframeworks = ["faults"]\n')
    for bad, needle in ((tmp_path / "missing" / "r.out", "does not exist"), (tmp_path, "is a directory")):
        out = stepdiff("run", str(case), flag, str(bad), timeout=60)
        assert out.returncode == 3, out.stderr
        assert needle in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert "stepdiff: faults:" not in out.stderr  # nothing ran
    keep_file = tmp_path / "a-file"
    keep_file.write_text("")
    out = stepdiff("run", str(case), "--keep", str(keep_file), timeout=60)
    assert out.returncode == 3 and "is not a folder" in out.stderr


def test_every_case_and_pin_is_checked_before_any_work(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[case]\nname = "good"\nframeworks = ["faults"]\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[case]\nname = "bad"\nframeworks = ["faults"]\n[run]\ntimeout_s = nan\n')
    out = stepdiff("run", str(good), str(bad), timeout=60)
    assert out.returncode == 3 and "run.timeout_s = nan: not a finite number" in out.stderr
    assert "stepdiff: faults:" not in out.stderr  # the good case did not run first
    out = stepdiff("run", str(good), "-f", "deepspeed==0.19.8,--index-url==http://evil.example", timeout=60)
    assert out.returncode == 3 and "is an installer option, not a requirement" in out.stderr


def test_exit_code_function_orders_verdicts() -> None:
    from stepdiff.harness.outcome import exit_code, worst_verdict

    table = {("agree",): 0, ("diverge",): 1, ("error",): 2, ("unsupported",): 4, ("agree", "unsupported"): 4,
             ("unsupported", "diverge"): 1, ("unsupported", "error"): 2, ("diverge", "error", "agree"): 2,
             ("agree", "diverge"): 1, (): 2}
    for verdicts, code in table.items():
        assert exit_code(verdicts) == code, verdicts
    assert worst_verdict(["unsupported", "diverge"]) == "diverge"
    with pytest.raises(ValueError):
        exit_code(["pass"])


def test_fuzz_save_case_and_bisect_releases_are_checked_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fuzz --save-case` into a place that cannot be written used to surface after the whole search; `bisect --from x`
    was an internal error (exit 5) from the release parser."""
    from stepdiff.harness import cli

    case = tmp_path / "c.toml"
    case.write_text('[case]\nname = "c"\nframeworks = ["faults"]\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args, needle in ((["fuzz", str(case), "--save-case", str(blocker / "x.toml")], "--save-case"),
                         (["fuzz", str(case), "--save-case", str(tmp_path)], "is a directory"),
                         (["bisect", str(case), "deepspeed", "--from", "x"], "'x' is not a release number"),
                         (["bisect", str(case), "deepspeed", "--to", "latest"], "'latest' is not a release number")):
        with pytest.raises(SystemExit) if "bisect" in args else contextlib.nullcontext() as raised:
            assert cli.main(args) == 3, args  # argparse's errors leave main() as SystemExit(3)
        if raised is not None:
            assert raised.value.code == 3
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stepdiff: error: ") and needle in lines[0], (args, lines)


def test_env_remove_needs_a_pattern_or_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The cache is shared by every stepdiff run on the machine: removing all of it is never the default."""
    from stepdiff.harness import cli

    monkeypatch.setenv("STEPDIFF_CACHE", str(tmp_path))
    envs_dir = tmp_path / "envs"
    for name in ("deepspeed-0.19.8-000000000000", "trl-1.16.0-000000000000"):
        (envs_dir / name).mkdir(parents=True)
    for args in (["env", "remove"], ["env", "remove", ""], ["env", "remove", " "], ["env", "remove", "trl", "--all"]):
        assert cli.main(args) == 3, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("stepdiff: error: env remove: "), err
    assert sorted(p.name for p in envs_dir.iterdir()) == ["deepspeed-0.19.8-000000000000", "trl-1.16.0-000000000000"]
    assert cli.main(["env", "remove", "trl-"]) == 0
    assert capsys.readouterr().out.strip() == "removed trl-1.16.0-000000000000"
    assert cli.main(["env", "remove", "--all"]) == 0
    assert list(envs_dir.iterdir()) == []


def test_a_case_with_no_framework_is_a_usage_error_before_any_work(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An empty case file loads (every field has a default) but names no framework: exit 3 and the fix, not an empty
    table with 'verdict: error (exit 2)' and no reason; and not after the other cases ran."""
    from stepdiff.harness import cli

    empty, good = tmp_path / "empty.toml", tmp_path / "good.toml"
    empty.write_text("")
    good.write_text('[case]\nname = "good"\nframeworks = ["faults"]\n')
    for args in (["run", str(empty)], ["run", str(good), str(empty)]):
        assert cli.main(args) == 3
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "no frameworks to run; fix: list them in case.frameworks" in lines[0], lines
        assert "faults" not in captured.out  # nothing ran
