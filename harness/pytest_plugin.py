"""pytest plugin (registered through the `pytest11` entry point): gate CI on stepdiff cases from your own test suite.

    def test_offload_step_matches_reference(stepdiff_run):
        result = stepdiff_run("cases/my-case.toml", ["deepspeed==0.19.8"])
        assert result.verdict == "agree", result.report

`stepdiff_run(case, frameworks=None, **fields)` loads a case file (or bundled case name), optionally overrides
fields (`batch__grad_accum=3`), runs it, and returns the CaseResult with a `.report` attribute holding the terminal
report. Importing this plugin imports neither torch nor any framework.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture
def stepdiff_run(tmp_path: Any) -> Callable[..., Any]:
    def run(case: str, frameworks: list[str] | None = None, **fields: Any) -> Any:
        from stepdiff.harness import spec as S
        from stepdiff.harness.cli import resolve_case
        from stepdiff.harness.runner import run_case
        from stepdiff.reports import terminal

        spec = S.load(resolve_case(case))
        if fields:
            spec = spec.replace(**fields)
        result = run_case(spec, list(frameworks or spec.case.frameworks), workdir=tmp_path / "stepdiff")
        result.report = terminal.render(result)  # type: ignore[attr-defined]
        return result

    return run
