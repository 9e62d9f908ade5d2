"""`stepdiff bisect`: the search over releases (on a scripted probe: introduced, fixed, releases that cannot be judged
skipped and never counted), version-set targets, and the release list from pip's configured index. The real bisect of
the DeepSpeed offload bug is a slow test in test_fuzz.py."""

from __future__ import annotations

import math

import pytest

from stepdiff.harness import spec as S
from stepdiff.harness.bisection import Probe, Target, _with_cause, bisect, list_releases, parse_target
from stepdiff.harness.errors import UsageError

RELEASES = [f"0.{i}.0" for i in range(40)]
SPEC = S.from_dict({"case": {"name": "b"}})


def scripted(bad: range, skip: set[int] = frozenset(), errors: set[int] = frozenset()):  # type: ignore[assignment]
    calls: list[str] = []

    def run(spec: S.Spec, target: Target, version: str) -> Probe:
        calls.append(version)
        i = RELEASES.index(version)
        if i in skip:
            return Probe(version, "not-installable", reason="no wheel for this torch")
        if i in errors:
            return Probe(version, "error", reason="crashed")
        if i in bad:
            return Probe(version, "diverge", "dropped-microbatches", 0.6, [1, 0, 0, 1])
        return Probe(version, "agree", max_rel_error=1e-7)

    return run, calls


def test_window_inside_the_range_names_introduced_and_fixed() -> None:
    run, calls = scripted(range(12, 31), skip={11, 20}, errors={21})
    r = bisect(SPEC, Target("deepspeed", "deepspeed", None, ()), RELEASES, say=lambda s: None, run=run)
    assert (r.introduced, r.last_good, r.fixed, r.last_bad) == ("0.12.0", "0.10.0", "0.31.0", "0.30.0")
    assert len(calls) <= 2 * math.ceil(math.log2(len(RELEASES))) + 4  # about log2(n) per side, not n
    assert "introduced in 0.12.0 (last good 0.10.0)" in r.summary() and "fixed in 0.31.0" in r.summary()
    assert "could not judge 0.11.0" in r.summary()  # a skipped release is reported, never counted good or bad
    assert r.probes["0.11.0"].outcome is None and r.probes["0.11.0"].verdict == "not-installable"


def test_end_differs_and_no_change() -> None:
    run, _ = scripted(range(25, 40))
    r = bisect(SPEC, Target("deepspeed", "deepspeed", None, ()), RELEASES, say=lambda s: None, run=run)
    assert r.introduced == "0.25.0" and r.last_good == "0.24.0" and r.fixed is None
    assert "not fixed by 0.39.0" in r.summary()
    run, calls = scripted(range(0))
    r = bisect(SPEC, Target("deepspeed", "deepspeed", None, ()), RELEASES, say=lambda s: None, run=run)
    assert r.introduced is None and "no change found" in r.summary()
    run, _ = scripted(range(0), skip=set(range(3)))
    r = bisect(SPEC, Target("deepspeed", "deepspeed", None, ()), RELEASES, say=lambda s: None, run=run)
    assert r.start == "0.3.0"  # the start is the first release that can be judged


def test_targets_and_version_sets() -> None:
    assert parse_target("deepspeed") == Target("deepspeed", "deepspeed", None, ())
    t = parse_target("trl==1.16.0,transformers==*")
    assert (t.package, t.adapter_version, t.extra) == ("transformers", "1.16.0", ())
    assert t.pin("4.57.0").label == "trl==1.16.0,transformers==4.57.0"
    assert parse_target("trl,deepspeed==0.19.8").pin("1.9.0").label == "trl==1.9.0,deepspeed==0.19.8"
    with pytest.raises(UsageError, match="unknown framework"):
        parse_target("deepspeedd")
    with pytest.raises(UsageError, match="==\\*"):
        parse_target("trl==1.16.0,transformers==4.57.0")


def test_releases_from_pips_index() -> None:
    releases = list_releases("deepspeed", "0.14.0", "0.19.8")
    assert releases[0] == "0.14.0" and releases[-1] == "0.19.8"
    assert {"0.15.1", "0.15.2", "0.18.9", "0.19.0"} <= set(releases)
    with pytest.raises(UsageError, match="no such release"):
        list_releases("deepspeed", "0.14.99", None)


def test_a_skipped_release_says_why() -> None:
    tail = ("Traceback (most recent call last):\n  File \"x.py\", line 9, in <module>\n"
            "    from torch.distributed.elastic.agent.server.api import log\n"
            "ImportError: cannot import name 'log' from 'torch.distributed.elastic.agent.server.api'\n")
    why = _with_cause("deepspeed worker exited with code 1 while starting", tail)
    assert why == ("deepspeed worker exited with code 1 while starting: ImportError: cannot import name 'log' from "
                   "'torch.distributed.elastic.agent.server.api'")
    assert _with_cause("worker timed out", "no exception here\n") == "worker timed out"
