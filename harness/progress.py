"""Progress of long work (environment builds, framework runs, fuzzing), on stderr only.

On a terminal: a live display (rich) with one line per task, a spinner and the elapsed time. Without a terminal, or
with --quiet: plain one-line records, `stepdiff: [  12.3s] deepspeed==0.18.9: diverge (31.2 s)`. Nothing here ever
writes to stdout, so `stepdiff run --json -` pipes clean JSON.

The harness reports through the module-level functions (`task`, `log`); the CLI chooses the display with
`display(...)`. Without a display, records are plain (what library users and the pytest plugin get).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class Display(Protocol):
    def start(self, key: int, label: str, text: str, announce: bool) -> None: ...
    def update(self, key: int, text: str) -> None: ...
    def finish(self, key: int, text: str, record: bool) -> None: ...
    def log(self, text: str) -> None: ...


class Plain:
    """One line per record on stderr, prefixed with the time since the display started."""

    def __init__(self) -> None:
        self.t0 = _START
        self.labels: dict[int, str] = {}

    def _line(self, text: str) -> None:
        print(f"stepdiff: [{time.perf_counter() - self.t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    def start(self, key: int, label: str, text: str, announce: bool) -> None:
        self.labels[key] = label
        if announce:
            self._line(f"{label}: {text}")

    def update(self, key: int, text: str) -> None:
        """Plain records are for logs: intermediate states are not worth a line each."""

    def finish(self, key: int, text: str, record: bool) -> None:
        label = self.labels.pop(key, "")
        if record:
            self._line(f"{label}: {text}")

    def log(self, text: str) -> None:
        self._line(text)


class Live:
    """A rich live display on stderr: a spinner, the task's label and state, and its elapsed time."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(SpinnerColumn(finished_text="[green]✓"),
                                 TextColumn("{task.fields[label]}", style="bold"), TextColumn("{task.description}"),
                                 TimeElapsedColumn(), console=self.console,
                                 redirect_stdout=False, redirect_stderr=True, transient=False)
        self.tasks: dict[int, Any] = {}

    def __enter__(self) -> Live:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, key: int, label: str, text: str, announce: bool) -> None:
        self.tasks[key] = self.progress.add_task(text, total=1, label=label)

    def update(self, key: int, text: str) -> None:
        if key in self.tasks:
            self.progress.update(self.tasks[key], description=text)

    def finish(self, key: int, text: str, record: bool) -> None:
        task = self.tasks.pop(key, None)
        if task is None:
            return
        if record:
            self.progress.update(task, description=text, completed=1)
        else:  # nothing worth keeping on screen (a cached environment)
            self.progress.remove_task(task)

    def log(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)


_display: Display | None = None
_START = time.perf_counter()
"""Plain records count from the first import (the start of the command), across cases."""
_counter = 0


def current() -> Display:
    global _display
    if _display is None:
        _display = Plain()
    return _display


def wants_live(quiet: bool = False) -> bool:
    """A live display only on an interactive terminal, never with --quiet."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def display(quiet: bool = False) -> Iterator[Display]:
    """Use a live display (terminal, not quiet) or plain records for the duration of the block."""
    global _display
    previous = _display
    if wants_live(quiet):
        with Live() as live:
            _display = live
            try:
                yield live
            finally:
                _display = previous
    else:
        _display = Plain()
        try:
            yield _display
        finally:
            _display = previous


class Task:
    def __init__(self, key: int, label: str) -> None:
        self.key, self.label = key, label
        self.t0 = time.perf_counter()
        self.final: str | None = None
        self.record = True

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, text: str) -> None:
        current().update(self.key, text)

    def done(self, text: str, record: bool = True) -> None:
        """The line the task ends with (record=False: nothing worth keeping, e.g. a cached environment)."""
        self.final, self.record = text, record


@contextlib.contextmanager
def task(label: str, text: str, announce: bool = True) -> Iterator[Task]:
    """A unit of long work: shown while it runs, ended with the text given to `done` (or 'failed' on an exception).
    announce=False: plain records skip the start line (work that is usually instant)."""
    global _counter
    _counter += 1
    t = Task(_counter, label)
    d = current()
    d.start(t.key, label, text, announce)
    try:
        yield t
    except BaseException as e:
        d.finish(t.key, f"failed after {t.elapsed:.1f} s ({type(e).__name__})", True)
        raise
    d.finish(t.key, t.final if t.final is not None else f"done ({t.elapsed:.1f} s)", t.record)


def log(text: str) -> None:
    current().log(text)


def tracked(label: str, run: Callable[[], Any]) -> Any:
    """Run one framework run as a task; it ends with the run's verdict and wall time."""
    with task(label, "running") as t:
        result = run()
        wall = getattr(result, "timings", {}).get("wall_s", t.elapsed)
        t.done(f"{result.verdict} ({wall:.1f} s)")
    return result
