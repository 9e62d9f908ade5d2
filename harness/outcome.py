"""Outcomes and exit codes: the contract a CI gate relies on (README "Exit codes").

One function decides the exit code for one case and for many: the worst verdict wins, in the order
error > diverge > unsupported > agree (never a numeric max: "unsupported" is 4 but must not hide an error or a
divergence). Nothing that goes wrong inside stepdiff may exit 0 or 1: usage errors exit 3, an unexpected exception
inside stepdiff exits EXIT_INTERNAL, a signal exits 128 + its number.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable

EXIT_AGREE = 0
EXIT_DIVERGE = 1
EXIT_ERROR = 2
EXIT_USAGE = 3
EXIT_UNSUPPORTED = 4
EXIT_INTERNAL = 5
"""An unexpected exception inside stepdiff itself (a bug in stepdiff, not in the framework under test)."""

SEVERITY = ("error", "diverge", "unsupported", "agree")
"""Verdicts from worst to best."""

EXIT_CODES = {"agree": EXIT_AGREE, "diverge": EXIT_DIVERGE, "error": EXIT_ERROR, "unsupported": EXIT_UNSUPPORTED}


def worst_verdict(verdicts: Iterable[str]) -> str:
    """The verdict of a set of runs (one case or many): error > diverge > unsupported > agree.

    No runs at all is an error: a tester that ran nothing must not report agreement."""
    seen = set(verdicts)
    unknown = seen - set(SEVERITY)
    if unknown:
        raise ValueError(f"unknown verdict(s) {sorted(unknown)}")
    return next((v for v in SEVERITY if v in seen), "error")


def exit_code(verdicts: Iterable[str]) -> int:
    """The process exit code of a set of run verdicts (one case or many)."""
    return EXIT_CODES[worst_verdict(verdicts)]


def exit_code_for_signal(signum: int) -> int:
    """The shell convention for a process stopped by a signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
