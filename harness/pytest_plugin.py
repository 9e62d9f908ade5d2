"""pytest plugin (registered through the `pytest11` entry point): gate CI on stepdiff cases from your own test suite.

    def test_offload_step_matches_reference(stepdiff_run):
        result = stepdiff_run("cases/my-case.toml", ["deepspeed==0.19.8"])
        assert result.verdict == "agree", result.report

`stepdiff_run(case, frameworks=None, **fields)` loads a case file (or bundled case name), optionally overrides
fields (`batch__grad_accum=3`), runs it, and returns the CaseResult with a `.report` attribute holding the terminal
report. Every call in one pytest session shares one pool of workers (`stepdiff_pool`, session-scoped): each
framework environment's worker starts once per session, not once per test (with pytest-xdist, once per xdist
worker). A crashed or timed-out worker is replaced for the next test; its error stays with the test that caused it.
Reference results are cached across sessions (stepdiff.harness.refcache). Importing this plugin imports neither
torch nor any framework.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def stepdiff_pool() -> Iterator[Any]:
    """The session's worker pool (stepdiff.harness.pool.WorkerPool), closed when the session ends. Its folder is a
    short temporary one (not under pytest's deep tmp_path): frameworks put sockets in their worker's TMPDIR."""
    import shutil
    import tempfile
    from pathlib import Path

    from stepdiff.harness.pool import WorkerPool

    root = Path(tempfile.mkdtemp(prefix="stepdiff-pool-"))
    pool = WorkerPool(root)
    try:
        yield pool
    finally:
        pool.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def stepdiff_run(tmp_path: Any, stepdiff_pool: Any) -> Callable[..., Any]:
    def run(case: str, frameworks: list[str] | None = None, **fields: Any) -> Any:
        from stepdiff.harness import spec as S
        from stepdiff.harness.cli import resolve_case
        from stepdiff.harness.runner import run_case
        from stepdiff.reports import terminal

        spec = S.load(resolve_case(case))
        if fields:
            spec = spec.replace(**fields)
        result = run_case(spec, list(frameworks or spec.case.frameworks), workdir=tmp_path / "stepdiff",
                          pool=stepdiff_pool)
        result.report = terminal.render(result)  # type: ignore[attr-defined]
        return result

    return run
