"""Metamorphic properties as test functions for a framework's own test suite (pytest, unittest, anything).

    from stepdiff.properties import ga_invariance

    def test_ga_invariance_with_offload():
        ga_invariance("deepspeed==0.19.8", case="deepspeed-zero2-offload-ga4", examples=5)

Each function runs a Hypothesis campaign of that property against the framework alone (no reference): it draws
configurations around `case` (a case file, a bundled case name, or None for stepdiff's default tiny spec), shrinks
any violation to a minimal configuration, writes it as a case file (under `.stepdiff/cases` unless `save_case` says
otherwise) and raises `PropertyViolation` (an AssertionError) naming it. It returns the campaign (every drawn
configuration and its verdict) when the property holds. Keyword arguments are those of `stepdiff fuzz`: `examples`,
`seed`, `profile` ('ci' or 'nightly'), `max_time`, `vary`, `fix`, `database`, `save_case`.

Importing this module imports neither torch nor any framework.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["PropertyViolation", "check", "dp_equals_ga", "duplicate", "ga_invariance", "noop", "padding",
           "permutation", "zero_lr"]


class PropertyViolation(AssertionError):
    """A metamorphic property failed; `campaign` holds the minimal configuration and the saved case."""

    def __init__(self, message: str, campaign: Any) -> None:
        super().__init__(message)
        self.campaign = campaign


def check(prop: str, framework: str, case: str | Path | None = None, **options: Any) -> Any:
    """Run property `prop` against `framework` ('NAME==VERSION[,PKG==VERSION...]'); raise PropertyViolation if it
    breaks (or a run errors); return the campaign otherwise."""
    from stepdiff.harness import spec as S
    from stepdiff.harness.cli import fuzz_summary, resolve_case
    from stepdiff.harness.fuzz import fuzz
    from stepdiff.harness.runner import parse_pin
    from stepdiff.harness.strategies import parse_fix

    pin = parse_pin(framework)
    base = S.load(resolve_case(str(case))) if case is not None else S.from_dict(
        {"case": {"name": f"default-{pin.name}", "frameworks": [framework]}})
    fix = options.pop("fix", None)
    if isinstance(fix, (list, tuple)):
        fix = parse_fix(list(fix))
    campaign = fuzz(base, pin, prop=prop, fix=fix, **options)
    if campaign.failing is not None:
        raise PropertyViolation(fuzz_summary(campaign), campaign)
    if campaign.runs == 0:
        raise PropertyViolation(f"{framework}: property {prop}: no drawn configuration could run "
                                f"({campaign.counts()})", campaign)
    return campaign


def ga_invariance(framework: str, case: str | Path | None = None, **options: Any) -> Any:
    """micro-batch size x gradient accumulation held fixed gives the same optimizer steps."""
    return check("ga_invariance", framework, case, **options)


def dp_equals_ga(framework: str, case: str | Path | None = None, **options: Any) -> Any:
    """world size 2 x GA g trains like world size 1 x GA 2g on the same samples."""
    return check("dp_equals_ga", framework, case, **options)


def permutation(framework: str, case: str | Path | None = None, **options: Any) -> Any:
    """reordering samples within an optimizer step changes nothing."""
    return check("permutation", framework, case, **options)


def padding(framework: str, case: str | Path | None = None, **options: Any) -> Any:
    """extra pad tokens change nothing."""
    return check("padding", framework, case, **options)


def zero_lr(framework: str, case: str | Path | None = None, **options: Any) -> Any:
    """learning rate 0 leaves every parameter unchanged."""
    return check("zero_lr", framework, case, **options)


def duplicate(framework: str, case: str | Path | None = None, **options: Any) -> Any:
    """a sample added twice weighs twice."""
    return check("duplicate", framework, case, **options)


def noop(framework: str, case: str | Path | None = None, **options: Any) -> Any:
    """switching a knob that should not change the math changes nothing."""
    return check("noop", framework, case, **options)
