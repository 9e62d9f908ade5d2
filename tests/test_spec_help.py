"""`stepdiff spec-help` lists every adapter's knob table (name, type, default, one-line doc) from the knob
dataclasses themselves, next to the spec's own fields."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from stepdiff.harness.registry import adapter_names, knob_class, knob_table


def spec_help() -> str:
    out = subprocess.run([sys.executable, "-m", "stepdiff", "spec-help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_every_knob_table_is_listed_from_its_dataclass() -> None:
    text = spec_help()
    assert "batch.grad_accum" in text  # the spec's own fields are still there
    tables = {n: knob_class(n) for n in adapter_names()}
    assert {n for n, c in tables.items() if c} >= {"deepspeed", "openrlhf", "trl", "verl"}
    for name, cls in tables.items():
        if cls is None:
            assert f"[{name}]" not in text  # the reference takes no knobs: no table
            continue
        section = text.split(f"\n[{name}]", 1)[1].split("\n[", 1)[0]
        for f in dataclasses.fields(cls):
            line = next(x for x in section.splitlines() if x.split() and x.split()[0] == f.name)
            assert repr(f.default) in line and f.metadata["doc"][:40] in line, line


def test_knob_table_types_and_defaults() -> None:
    rows = {k.name: k for k in knob_table("deepspeed")}
    assert rows["zero_stage"].type == "int" and rows["zero_stage"].default == 2
    assert rows["offload_optimizer"].type == "'none' | 'cpu'"
    assert "overlap_comm" in rows["overlap_comm"].doc
    assert knob_table("reference") == []
