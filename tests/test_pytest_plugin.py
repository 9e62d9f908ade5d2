"""The `stepdiff_run` fixture (the pytest11 plugin), used the way a user's own test suite uses it, through pytester:
a clean case must come out `agree` and a broken one `diverge`, from the numbers, in the same session."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = '''
CASE = """
[case]
name = "plugin-{mode}"
frameworks = ["faults"]
[batch]
grad_accum = 2
[faults]
mode = "{mode}"
"""


def write(tmp_path, mode):
    path = tmp_path / f"{mode}.toml"
    path.write_text(CASE.format(mode=mode))
    return str(path)


def test_clean_step_agrees(stepdiff_run, tmp_path):
    result = stepdiff_run(write(tmp_path, "none"), batch__grad_accum=3)  # fields override the case
    assert result.spec.batch.grad_accum == 3
    assert result.verdict == "agree", result.report
    assert result.exit_code == 0


def test_dropped_microbatch_diverges(stepdiff_run, tmp_path):
    result = stepdiff_run(write(tmp_path, "drop"))
    assert result.verdict == "diverge", result.report
    assert result.runs[0].signature.name == "dropped-microbatches", result.report
    assert "dropped-microbatches" in result.report
'''


def test_stepdiff_run_fixture_in_a_user_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    # a subprocess, as a user's `pytest` run: the plugin comes from the installed entry point, nothing else
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_fixture_reports_a_failing_gate(pytester: pytest.Pytester) -> None:
    """The sibling: a user's gate that expects `agree` fails on the dropped micro-batch, with the report shown."""
    pytester.makepyfile(test_gate=USER_TESTS.split("def test_clean")[0] + '''
def test_gate(stepdiff_run, tmp_path):
    result = stepdiff_run(write(tmp_path, "drop"))
    assert result.verdict == "agree", result.report
''')
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*dropped-microbatches*"])
