"""Errors the harness raises on purpose. Each carries a one-line message meant for the user, not a traceback."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: a broken case file, an unknown framework, a version that does not install.

    The CLI prints the message on one line and exits with the usage-error code.
    """


class SpecError(UsageError):
    """A case file or spec value is invalid. The message names the field, the bad value and the fix."""

    def __init__(self, field: str, value: object, problem: str, fix: str) -> None:
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        super().__init__(f"{field} = {value!r}: {problem}; fix: {fix}")


class EnvironmentBuildError(UsageError):
    """An environment could not be built (the installer's reason in one line)."""


class WorkerError(Exception):
    """A framework run crashed, hung, produced NaN/Inf, or produced an incomplete record.

    Becomes an `error` verdict carrying the tail of the framework's own output. Never a pass.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.message, self.log_tail = message, log_tail
        super().__init__(message)
