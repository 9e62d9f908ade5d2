"""Errors the harness raises on purpose. Each carries a one-line message meant for the user, not a traceback."""

from __future__ import annotations

VALUE_CHARS = 60
"""A bad value is shown truncated to this many characters: a message stays one readable line."""


def one_line(text: object, limit: int = 400) -> str:
    """`text` on one line (control characters escaped), truncated to `limit` characters."""
    s = str(text)
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def show_value(value: object, limit: int = VALUE_CHARS) -> str:
    """repr() of a user's value, escaped onto one line and truncated."""
    try:
        r = repr(value)
    except RecursionError:  # a pathologically nested value
        r = f"<deeply nested {type(value).__name__}>"
    return one_line(r, limit)


class UsageError(Exception):
    """Bad input from the user: a broken case file, an unknown framework, a version that does not install.

    The CLI prints the message on one line and exits with the usage-error code.
    """


class SpecError(UsageError):
    """A case file or spec value is invalid. The message names the field, the bad value and the fix."""

    def __init__(self, field: str, value: object, problem: str, fix: str) -> None:
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        super().__init__(f"{one_line(field, 120)} = {show_value(value)}: {one_line(problem)}; fix: {one_line(fix)}")


class EnvironmentBuildError(UsageError):
    """An environment could not be built (the installer's reason in one line)."""


class WorkerError(Exception):
    """A framework run crashed, hung, produced NaN/Inf, or produced an incomplete record.

    Becomes an `error` verdict carrying the tail of the framework's own output. Never a pass.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.message, self.log_tail = message, log_tail
        super().__init__(message)


class Interrupted(BaseException):
    """SIGTERM/SIGINT/SIGHUP arrived: stop every worker, remove temporary directories, exit 128 + signal.

    A BaseException (like KeyboardInterrupt) so that no `except Exception` on the way up can swallow it."""

    def __init__(self, signum: int, where: str = "", stopped: list[str] | None = None) -> None:
        self.signum, self.where, self.stopped = signum, where, list(stopped or [])
        super().__init__(signum)


class UnsupportedError(WorkerError):
    """The installed release cannot take a knob of the spec (the adapter raised `Unsupported` inside its worker).

    Becomes the `unsupported` verdict with the adapter's reason: reported, never approximated, never a pass. (Code
    that only knows WorkerError reports it as an error, which is never a pass either.)
    """
