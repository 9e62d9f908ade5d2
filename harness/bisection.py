"""`stepdiff bisect`: which release introduced a divergence, and which fixed it, from the numbers (not named `bisect`:
worker_boot.py runs from this folder, and the standard library has a `bisect`).

Releases come from the package index pip is configured with (`pip index versions`, so pip's index-url, extra
index urls and find-links apply; nothing is scraped). Each probe runs the case through `stepdiff run`'s own code path
(`runner.run_case`) in that release's environment (built once, cached); its outcome is the verdict plus the
signature's name. Releases that do not install with the host torch, and runs that error or are unsupported, are
reported and skipped over: never counted as good or bad.

Search, assuming one window of changed behaviour inside [from, to]: the start's outcome is the reference outcome
("good"). If the end differs, binary-search the first differing release (introduced) in between. If the end has the
start's outcome, probe the range breadth-first (middle, then quarters, ...) until a release differs, then
binary-search both sides of it: the first differing release (introduced) and the first release after it with the
start's outcome again (fixed). About 2 log2(n) probes; each prints its verdict, signature and timings.

Version sets: FRAMEWORK 'trl==1.16.0,transformers==*' bisects transformers with trl held at 1.16.0; a bare
'deepspeed' bisects the adapter's own package.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import pins
from .errors import UsageError
from .registry import adapter_names, get_adapter
from .runner import FrameworkPin, run_case
from .spec import Spec


@dataclass(frozen=True)
class Target:
    """What is bisected: the adapter, the package whose releases vary, and the rest of the version set."""

    adapter: str
    package: str
    adapter_version: str | None
    """The adapter's own pinned version when another package is bisected."""
    extra: tuple[str, ...]
    """Other pins of the version set, held fixed."""

    def pin(self, version: str) -> FrameworkPin:
        if self.package == self.adapter_package:
            return FrameworkPin(self.adapter, version, self.extra)
        return FrameworkPin(self.adapter, self.adapter_version, (*self.extra, f"{self.package}=={version}"))

    @property
    def adapter_package(self) -> str:
        return str(get_adapter(self.adapter).capabilities.framework)


def parse_target(text: str) -> Target:
    """'deepspeed' | 'trl==1.16.0,transformers==*' | 'trl,deepspeed==0.19.8' (a bare first name: the adapter's own
    package is bisected)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UsageError("bisect: FRAMEWORK is empty; e.g. deepspeed or 'trl==1.16.0,transformers==*'")
    first, *rest = parts
    name, sep, version = first.partition("==")
    name = name.strip().lower()
    if name not in adapter_names() or name == "reference":
        known = ", ".join(n for n in adapter_names() if n != "reference")
        raise UsageError(f"bisect: unknown framework {name!r}; known: {known}")
    own = str(get_adapter(name).capabilities.framework)
    starred = [p for p in rest if p.replace(" ", "").endswith("==*") or "==" not in p]
    if version.strip() in ("", "*"):
        if starred:
            raise UsageError(f"bisect {text!r}: bisect one package at a time (pin {name} to a version)")
        extra = tuple(_checked(p, text) for p in rest)
        return Target(name, own, None, extra)
    if len(starred) != 1:
        raise UsageError(f"bisect {text!r}: mark the package to bisect with ==*, e.g. 'trl==1.16.0,transformers==*'")
    package = starred[0].split("==")[0].strip().lower()
    pins.requirement(package, "bisect", text)  # a plain distribution name, nothing else
    extra = tuple(_checked(p, text) for p in rest if p not in starred)
    return Target(name, package, version.strip(), extra)


def _checked(piece: str, text: str) -> str:
    """A held pin as PEP 508 name + specifier (options, URLs, markers refused, as for every pin)."""
    dist, spec = pins.requirement(piece, "bisect", text)
    return f"{dist}{spec}"


def _vkey(v: str) -> Any:
    from packaging.version import Version

    return Version(v)


def list_releases(package: str, lo: str | None = None, hi: str | None = None) -> list[str]:
    """The package's final releases in [lo, hi], oldest first, from pip's configured index (`pip index versions`)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package, "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=300)
    found = re.search(r"Available versions:\s*(.+)", proc.stdout)
    if proc.returncode != 0 or not found:
        why = (proc.stderr.strip().splitlines() or ["no versions listed"])[-1]
        raise UsageError(f"bisect: cannot list {package} releases from pip's configured index: {why}")
    versions = sorted({v.strip() for v in found.group(1).split(",") if v.strip()}, key=_vkey)
    out = [v for v in versions if (lo is None or _vkey(v) >= _vkey(lo)) and (hi is None or _vkey(v) <= _vkey(hi))]
    for bound, flag in ((lo, "--from"), (hi, "--to")):
        if bound is not None and bound not in versions:
            raise UsageError(f"bisect: {flag} {bound}: {package} has no such release on the index "
                             f"(nearest: {', '.join(_nearest(versions, bound))})")
    if len(out) < 2:
        raise UsageError(f"bisect: fewer than two {package} releases in [{lo}, {hi}]")
    return out


def _nearest(versions: list[str], v: str) -> list[str]:
    k = _vkey(v)
    below = [x for x in versions if _vkey(x) < k][-1:]
    above = [x for x in versions if _vkey(x) > k][:1]
    return below + above


@dataclass
class Probe:
    version: str
    verdict: str
    """agree | diverge | error | unsupported | not-installable."""
    signature: str | None = None
    max_rel_error: float | None = None
    weights: list[float] | None = None
    reason: str = ""
    env_build_s: float = 0.0
    run_s: float = 0.0

    @property
    def outcome(self) -> tuple[str, str | None] | None:
        """What is compared between releases; None when the release cannot be judged (skipped)."""
        if self.verdict in ("agree", "diverge"):
            return (self.verdict, self.signature if self.verdict == "diverge" else None)
        return None

    def line(self) -> str:
        if self.outcome is None:
            return f"{self.version}: {self.verdict.upper()} - skipped ({self.reason})"
        sig = f" {self.signature}" if self.signature else ""
        w = " weights [" + ", ".join(f"{x:.2f}" for x in self.weights) + "]" if self.weights else ""
        err = f" max rel err {self.max_rel_error:.2e}" if self.max_rel_error is not None else ""
        build = f"env built in {self.env_build_s:.0f} s, " if self.env_build_s else "env cached, "
        return f"{self.version}: {self.verdict.upper()}{sig}{w}{err} ({build}run {self.run_s:.0f} s)"


@dataclass
class BisectResult:
    package: str
    releases: list[str]
    probes: dict[str, Probe] = field(default_factory=dict)
    start: str | None = None
    introduced: str | None = None
    last_good: str | None = None
    fixed: str | None = None
    last_bad: str | None = None
    elapsed_s: float = 0.0

    def summary(self) -> str:
        pkg = self.package
        if self.start is None:
            return f"{pkg}: no release in the range could be judged"
        good = self.probes[self.start]
        if self.introduced is None:
            return (f"{pkg}: every probed release behaves like {self.start} ({good.verdict}"
                    f"{' ' + good.signature if good.signature else ''}); no change found in the range")
        bad = self.probes[self.introduced]
        what = f"{bad.verdict}{' ' + bad.signature if bad.signature else ''}"
        text = f"{pkg}: introduced in {self.introduced} (last good {self.last_good}): {what}"
        if self.fixed:
            text += f"; fixed in {self.fixed} (last bad {self.last_bad})"
        else:
            text += f"; not fixed by {self.releases[-1]}"
        gaps = self._unjudged(self.last_good, self.introduced) + self._unjudged(self.last_bad, self.fixed)
        if gaps:
            text += f" (could not judge {', '.join(gaps)}, between those)"
        return text

    def _unjudged(self, a: str | None, b: str | None) -> list[str]:
        if a is None or b is None:
            return []
        i, j = self.releases.index(a), self.releases.index(b)
        return self.releases[i + 1 : j]

    def to_json(self) -> dict[str, Any]:
        return {"package": self.package, "releases": self.releases, "start": self.start,
                "introduced": self.introduced, "last_good": self.last_good, "fixed": self.fixed,
                "last_bad": self.last_bad, "elapsed_s": round(self.elapsed_s, 1),
                "probes": [vars(p) for p in self.probes.values()]}


def probe(spec: Spec, target: Target, version: str) -> Probe:
    """One release through `stepdiff run`'s code path. A release that does not install is 'not-installable'."""
    from .runner import _environment

    t0 = time.perf_counter()
    pin = target.pin(version)
    try:
        env = _environment(pin)  # built once and cached; a release that does not install is a UsageError
        build_s = 0.0 if env.cached else env.build_s
        case = run_case(spec, [pin], log=lambda _m: None)
    except UsageError as e:
        return Probe(version, "not-installable", reason=str(e)[:300], run_s=time.perf_counter() - t0)
    r = case.runs[0]
    reason = r.reason if r.verdict != "error" else _with_cause(r.reason, r.log_tail)
    return Probe(version, r.verdict, r.signature.name if r.signature else None, r.max_rel_grad_error,
                 list(r.fit.weights) if r.fit else None, reason[:300], build_s, time.perf_counter() - t0 - build_s)


def _with_cause(reason: str, log_tail: str) -> str:
    """An error's reason plus the framework's own last exception line, so a skipped release says why (e.g. deepspeed
    0.14.0-0.14.3 with torch 2.13: 'ImportError: cannot import name 'log' from torch.distributed.elastic...')."""
    found = [ln.strip() for ln in log_tail.splitlines() if re.match(r"\s*[\w.]*(Error|Exception)\b.*:", ln)]
    return f"{reason}: {found[-1][:200]}" if found and found[-1] not in reason else reason


def bisect(spec: Spec, target: Target, releases: list[str], find_fix: bool = True,
           say: Callable[[str], None] | None = None,
           run: Callable[[Spec, Target, str], Probe] = probe) -> BisectResult:
    """The search described in the module docstring."""
    out = BisectResult(target.package, releases)
    t0 = time.perf_counter()
    emit = say or (lambda s: print(s, flush=True))

    def get(i: int) -> Probe:
        v = releases[i]
        if v not in out.probes:
            p = run(spec, target, v)
            out.probes[v] = p
            emit(f"  probe {len(out.probes):2d}: {target.package}=={p.line()}")
        return out.probes[v]

    # the start: the first release (from the bottom) that can be judged
    lo = 0
    while lo < len(releases) and get(lo).outcome is None:
        lo += 1
    if lo == len(releases):
        out.elapsed_s = time.perf_counter() - t0
        return out
    out.start = releases[lo]
    good = get(lo).outcome
    hi = len(releases) - 1
    while hi > lo and get(hi).outcome is None:
        hi -= 1

    def differs(i: int) -> bool | None:
        o = get(i).outcome
        return None if o is None else o != good

    bad: int | None = hi if hi > lo and differs(hi) else None
    if bad is None:  # same outcome at both ends: look for a differing release inside, breadth-first
        for i in _breadth_first(lo, hi):
            if differs(i):
                bad = i
                break
    if bad is None:
        out.elapsed_s = time.perf_counter() - t0
        return out
    last_good, first = _first_true(lo, bad, differs)
    out.introduced, out.last_good = releases[first], releases[last_good]
    if find_fix and bad < hi and not differs(hi):
        last_bad, fix = _first_true(bad, hi, lambda i: None if differs(i) is None else not differs(i))
        out.fixed, out.last_bad = releases[fix], releases[last_bad]
    out.elapsed_s = time.perf_counter() - t0
    return out


def _breadth_first(lo: int, hi: int) -> list[int]:
    """Interior indices of (lo, hi) in breadth-first bisection order: middle, quarters, eighths, ..."""
    order, seen = [], set()
    spans = [(lo, hi)]
    while spans:
        nxt = []
        for a, b in spans:
            if b - a < 2:
                continue
            m = (a + b) // 2
            if m not in seen:
                seen.add(m)
                order.append(m)
            nxt += [(a, m), (m, b)]
        spans = nxt
    return order


def _first_true(lo: int, hi: int, pred: Callable[[int], bool | None]) -> tuple[int, int]:
    """(last false, first true): given pred(lo) false and pred(hi) true, the adjacent judged pair in [lo, hi] where
    pred turns true. Indices where pred is None (the release cannot be judged) are stepped over toward the nearest
    judgeable one; any left between the pair are the releases that could not be judged."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        j, verdict = mid, pred(mid)
        k = 1
        while verdict is None:  # step outward from mid to a judgeable release strictly inside (lo, hi)
            cands = [c for c in (mid - k, mid + k) if lo < c < hi]
            if not cands:
                break
            for c in cands:
                verdict = pred(c)
                if verdict is not None:
                    j = c
                    break
            k += 1
        if verdict is None:
            break
        if verdict:
            hi = j
        else:
            lo = j
    return lo, hi
