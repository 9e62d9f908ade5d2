"""Hypothesis fuzzing of whole step specs against one framework: against the reference, or a metamorphic property.

A campaign draws configurations from `strategies` (everything the adapter can express, narrowed by --vary/--fix),
runs each through a `Session` (long-lived workers: imports and distributed start-up paid once), and lets Hypothesis
shrink the first configuration that does not agree (or that breaks the property) to a minimal one. That one is
written as a complete case file (`save_case`), re-run with `stepdiff run`'s own code path, and its report saved
beside it.

Every drawn configuration, its verdict, its largest error and its signature are kept (`Campaign.examples`, and the
JSON). Draws the adapter cannot honour are counted as unsupported, never as passes; draws the spec itself refuses
(e.g. a group size that does not divide the batch) as invalid.

Hypothesis conventions: settings profiles `ci` (small, seeded so every run tries the same examples) and `nightly`
(large, random), an example database in the project (`.stepdiff/hypothesis`) so a found failure is replayed first
next time, `seed`, `examples`, `max_time`; live progress on a terminal.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import properties as P
from . import strategies as ST
from .compare import RunResult
from .errors import SpecError, UsageError
from .runner import FrameworkPin
from .session import Session, spec_key
from .spec import Spec, to_dict

RESULTS_DIR = Path(".stepdiff")
"""The project's results folder (relative to the working directory): saved cases and the example database."""
DEFAULT_DATABASE = RESULTS_DIR / "hypothesis"

PROFILES: dict[str, dict[str, Any]] = {
    "ci": {"max_examples": 20, "seed": 0},
    "nightly": {"max_examples": 300, "seed": None},
}
"""Hypothesis settings per profile. `ci`: small and derandomised (a fixed seed, so every run draws the same
configurations; the database still replays saved failures first). `nightly`: large and random."""


@dataclass
class Example:
    index: int
    phase: str
    """'search' before the first failure, 'shrink' after it."""
    config: dict[str, Any]
    """The drawn dimensions (JSON-friendly)."""
    verdict: str
    """agree | diverge | error (reference) or hold | violated | error (property); unsupported (the adapter cannot
    honour it); invalid (the spec refuses the combination); unjudged (the reference could not calibrate a bound for
    it, e.g. a chaotic trajectory whose float32 and float64 runs disagree). The last three are counted apart."""
    reason: str
    max_rel_error: float | None = None
    signature: str | None = None
    weights: list[float] | None = None
    microbatch_tokens: str | None = None
    """Supervised tokens per micro-batch of step 0 (per rank): the shape the aggregation bugs need."""
    elapsed_s: float = 0.0

    @property
    def failing(self) -> bool:
        return self.verdict in ("diverge", "error", "violated")

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "phase": self.phase, "verdict": self.verdict, "reason": self.reason,
                "max_rel_error": _num(self.max_rel_error), "signature": self.signature, "weights": self.weights,
                "microbatch_tokens": self.microbatch_tokens, "elapsed_s": round(self.elapsed_s, 3),
                "config": self.config}


def _num(x: float | None) -> float | str | None:
    return x if x is None or math.isfinite(x) else str(x)


@dataclass
class Campaign:
    """One campaign's outcome: every example, and the minimal failure (if any) with its saved case."""

    case: str
    framework: str
    prop: str | None
    """The property checked, or None (against the reference)."""
    profile: str
    seed: int | None
    max_examples: int
    active: list[str]
    fixed: dict[str, Any]
    examples: list[Example] = field(default_factory=list)
    failing: Example | None = None
    changed: dict[str, Any] = field(default_factory=dict)
    """The minimal failing configuration's dimensions that differ from the base case."""
    result: RunResult | None = None
    """The minimal failing configuration's comparison with the reference (reference campaigns)."""
    outcome: P.Outcome | None = None
    """The minimal failing configuration's property outcome (property campaigns)."""
    spec: Spec | None = None
    """The minimal failing spec (for a property: the variant saved as the case)."""
    saved_case: Path | None = None
    saved_report: Path | None = None
    reproduced: str | None = None
    """The verdict `stepdiff run` gives the saved case (the proof that it reproduces)."""
    stopped: str | None = None
    """Why the search stopped early (max time), or None."""
    other_failures: list[int] = field(default_factory=list)
    """Indices of failing examples of another kind than the one shrunk (e.g. crashes seen while shrinking a
    divergence): reported, never dropped."""
    elapsed_s: float = 0.0

    def count(self, verdict: str) -> int:
        return sum(1 for e in self.examples if e.verdict == verdict)

    @property
    def runs(self) -> int:
        return sum(1 for e in self.examples if e.verdict not in ("unsupported", "invalid", "unjudged"))

    @property
    def verdict(self) -> str:
        """error > diverge > unsupported (nothing could run) > agree."""
        kinds = {e.verdict for e in self.examples if e.failing}
        if "error" in kinds:
            return "error"
        if self.failing is not None or kinds:
            return "diverge"
        return "unsupported" if self.runs == 0 else "agree"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.examples:
            out[e.verdict] = out.get(e.verdict, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "case": self.case, "framework": self.framework, "property": self.prop, "profile": self.profile,
            "seed": self.seed, "max_examples": self.max_examples, "verdict": self.verdict,
            "runs": self.runs, "counts": self.counts(), "stopped": self.stopped, "elapsed_s": round(self.elapsed_s, 1),
            "dimensions": self.active, "fixed": self.fixed, "other_failures": self.other_failures,
            "failing": None if self.failing is None else {
                "example": self.failing.to_json(),
                "changed_from_base": self.changed,
                "signature": r.signature.name if r and r.signature else None,
                "signature_text": r.signature.text if r and r.signature else None,
                "microbatch_weights": list(r.fit.weights) if r and r.fit else None,
                "property_reason": self.outcome.reason if self.outcome else None,
                "variants": [label for label, _ in self.outcome.variants] if self.outcome else None,
                "saved_case": str(self.saved_case) if self.saved_case else None,
                "saved_report": str(self.saved_report) if self.saved_report else None,
                "reproduced_by_stepdiff_run": self.reproduced,
            },
            "examples": [e.to_json() for e in self.examples],
        }


# --------------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Live progress: one rewritten status line on a terminal, one line per example otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, live: bool | None = None,
                 space: ST.Space | None = None) -> None:
        self.label, self.total, self.space = label, total, space
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live

    def example(self, c: Campaign, e: Example) -> None:
        counts = c.counts()
        failing = sum(counts.get(v, 0) for v in ("diverge", "error", "violated"))
        apart = counts.get("unsupported", 0) + counts.get("invalid", 0)
        shown = _short(ST.changed(self.space, e.config) if self.space else e.config)
        if self.live:
            state = f"shrinking: {shown}" if e.phase == "shrink" else f"last: {e.verdict}"
            line = (f"[{self.label}] {c.runs}/{self.total} run, {failing} failing, {apart} unsupported/invalid; "
                    f"{state}")
            width = 160
            self.stream.write("\r" + line[:width].ljust(width))
        else:
            err = f" {e.max_rel_error:.2e}" if e.max_rel_error is not None else ""
            self.stream.write(f"  [{self.label}] #{e.index} {e.phase} {e.verdict}{err} ({e.elapsed_s:.1f} s) {shown}\n")
        self.stream.flush()

    def done(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def _short(cfg: Mapping[str, Any]) -> str:
    parts = []
    for k, v in cfg.items():
        if k == "data.samples":
            v = {"lengths": [tuple(x) for x in v["lengths"]]} if "lengths" in v else v
            text = json.dumps(v, separators=(",", ":"))
            parts.append(f"{k}={text[:60]}{'...' if len(text) > 60 else ''}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------------------
# The campaign


def fuzz(base: Spec, pin: FrameworkPin, *, prop: str | None = None, vary: Sequence[str] = (),
         fix: Mapping[str, Any] | None = None, limits: ST.Limits | None = None, profile: str = "ci",
         examples: int | None = None, seed: int | None = None, max_time: float | None = None,
         database: Path | None = DEFAULT_DATABASE, workdir: Path | None = None,
         progress: Progress | None = None, save_case: Path | None | bool = None, reproduce: bool = True,
         log: Callable[[str], None] | None = None, max_shrink_time: float = 3600.0) -> Campaign:
    """Search the configuration space around `base` for one where `pin` disagrees with the reference (or breaks the
    property `prop`), shrink it, and save it as a case (default path under `.stepdiff/cases`; `save_case=False`
    saves nothing)."""
    try:
        from hypothesis import HealthCheck, Phase, Verbosity, given, reject, settings
        from hypothesis import seed as hseed
        from hypothesis import strategies as st
        from hypothesis.database import DirectoryBasedExampleDatabase
        from hypothesis.errors import Unsatisfiable
    except ImportError:
        raise UsageError("stepdiff fuzz needs hypothesis: pip install hypothesis") from None
    if profile not in PROFILES:
        raise UsageError(f"--profile {profile!r}: known profiles are {', '.join(PROFILES)}")
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    space = ST.build_space(base, pin.name, pin.version, vary, fix, limits, pin.extra)
    the_prop = P.get_property(prop) if prop else None
    if the_prop is not None:
        why = the_prop.needs(space)
        if why:
            raise UsageError(why)
    prof = PROFILES[profile]
    max_examples = int(examples if examples is not None else prof["max_examples"])
    if max_examples < 1:
        raise UsageError("--examples must be at least 1")
    use_seed = seed if seed is not None else prof["seed"]
    c = Campaign(base.case.name, pin.label, the_prop.name if the_prop else None, profile, use_seed, max_examples,
                 list(space.active), {k: to_dict(v) for k, v in space.fixed.items()})
    t0 = time.monotonic()
    deadline = None if max_time is None else t0 + max_time
    cache: dict[str, tuple[Example, Any]] = {}
    state: dict[str, Any] = {"phase": "search", "last": None}

    if progress is not None and progress.space is None:
        progress.space = space
    with Session(pin, workdir) as session:

        def run_one(cfg: dict[str, Any], data: Any) -> tuple[Example, Any]:
            """Returns the example and its detail (RunResult or Outcome); raises reject() when it cannot run."""
            public = P.public_config(cfg)
            try:
                if the_prop is None:
                    spec = ST.apply(space, public)
                    variants: Any = [("", spec)]
                else:
                    variants = P.build(the_prop, data, space, cfg)
            except SpecError as e:
                _record(Example(len(c.examples), state["phase"], _jsonable(cfg), "invalid", str(e)))
                reject()
            if isinstance(variants, str):
                _record(Example(len(c.examples), state["phase"], _jsonable(cfg), "unsupported", variants))
                reject()
            key = "|".join(spec_key(s) for _, s in variants)
            if key in cache:
                return cache[key]
            for label, s in variants:
                why = session.unsupported(s)
                if why:
                    _record(Example(len(c.examples), state["phase"], _jsonable(cfg), "unsupported",
                                    f"{label + ': ' if label else ''}{why}"))
                    reject()
            if deadline is not None and time.monotonic() > deadline and c.runs > 0:  # at least one run, always
                c.stopped = f"max time {max_time:g} s reached"
                reject()
            t1 = time.monotonic()
            spec = variants[0][1]
            detail: Any
            if the_prop is None:
                res = session.run(spec)
                if (res.meta or {}).get("reference_failed"):  # e.g. a chaotic trajectory: fp32 and fp64 disagree
                    _record(Example(len(c.examples), state["phase"], _jsonable(cfg), "unjudged", res.reason))
                    reject()
                if res.verdict == "unsupported":  # the installed release refused a knob inside its worker
                    _record(Example(len(c.examples), state["phase"], _jsonable(cfg), "unsupported", res.reason))
                    reject()
                detail = res
                ex = Example(len(c.examples), state["phase"], _jsonable(cfg), res.verdict, res.reason,
                             res.max_rel_grad_error, res.signature.name if res.signature else None,
                             list(res.fit.weights) if res.fit else None, ST.describe_samples(spec))
            else:
                out = P.check(the_prop, session, variants)
                if out.verdict in ("unjudged", "unsupported"):
                    _record(Example(len(c.examples), state["phase"], _jsonable(cfg), out.verdict, out.reason))
                    reject()
                detail = out
                ex = Example(len(c.examples), state["phase"], _jsonable(cfg), out.verdict, out.reason, out.max_error,
                             microbatch_tokens=ST.describe_samples(spec))
            ex.elapsed_s = time.monotonic() - t1
            _record(ex)
            cache[key] = (ex, detail)
            return ex, detail

        def _record(ex: Example) -> None:
            c.examples.append(ex)
            if progress is not None:
                progress.example(c, ex)

        def check(data: Any) -> None:
            pre = P.preset(the_prop, data, space) if the_prop else {}
            cfg = ST.draw(data, space, pre)
            ex, detail = run_one(cfg, data)
            if ex.failing:
                # the first failure's kind is the one shrunk: Hypothesis would otherwise 'slip' from a divergence to
                # any smaller crash (or back); a failure of the other kind is kept and reported, not shrunk
                state.setdefault("target", ex.verdict)
                if ex.verdict != state["target"]:
                    if ex.index not in c.other_failures:
                        c.other_failures.append(ex.index)
                    return
                state["phase"] = "shrink"
                state["last"] = (ex, detail, cfg)
                raise AssertionError(f"{pin.label}: {ex.verdict}: {ex.reason}")

        # no 'explain' phase: it re-runs the minimal failure with each part randomised, a framework run each
        phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
        wrapped = given(st.data())(check)
        if use_seed is not None:
            # before settings: hypothesis's @seed also switches the example database off (it is meant to reproduce
            # one failure), which left the ci profile (seed 0) never saving nor replaying a failure
            wrapped = hseed(use_seed)(wrapped)
        wrapped = settings(max_examples=max_examples, deadline=None, derandomize=False, verbosity=Verbosity.quiet,
                           phases=phases,
                           database=DirectoryBasedExampleDatabase(str(database)) if database else None,
                           suppress_health_check=list(HealthCheck), report_multiple_bugs=False)(wrapped)
        # one database key per (case, framework, property, space): a saved failure replays only where it was found
        wrapped.hypothesis.inner_test._hypothesis_internal_add_digest = json.dumps(  # type: ignore[attr-defined]
            [base.case.name, pin.label, c.prop, c.active, c.fixed, repr(space.limits)], sort_keys=True,
            default=str).encode()
        try:
            with _shrink_budget(max_shrink_time):
                wrapped()
        except AssertionError:
            ex, detail, cfg = state["last"]
            c.failing = ex
            c.changed = _jsonable(ST.changed(space, cfg))
            if isinstance(detail, P.Outcome):
                c.outcome = detail
            else:
                c.result = detail
                c.spec = ST.apply(space, P.public_config(cfg))
        except Unsatisfiable:
            pass  # every draw was unsupported or invalid: counted, verdict 'unsupported'
        finally:
            if progress is not None:
                progress.done()
    c.elapsed_s = time.monotonic() - t0
    if c.failing is not None and save_case is not False:
        from .casefile import save_finding

        save_finding(c, base, pin, space, None if save_case in (None, True) else Path(str(save_case)), reproduce,
                     say, workdir)
    return c


@contextlib.contextmanager
def _shrink_budget(seconds: float) -> Iterator[None]:
    """Hypothesis stops shrinking after 5 minutes (engine.MAX_SHRINKING_SECONDS), which is a few framework runs on
    a busy CPU: a campaign gets `seconds` instead (its --max-time still stops it earlier)."""
    from hypothesis.internal.conjecture import engine

    old = getattr(engine, "MAX_SHRINKING_SECONDS", None)
    engine.MAX_SHRINKING_SECONDS = int(seconds)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if old is not None:
            engine.MAX_SHRINKING_SECONDS = old  # type: ignore[attr-defined]


def _jsonable(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: to_dict(v) for k, v in cfg.items()}
