"""The adapter conformance kit, run by every adapter against itself, plus a negative control that must fail it."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepdiff.harness import spec as S
from stepdiff.harness.conformance import base_spec, run_conformance
from stepdiff.harness.runner import FrameworkPin, parse_pin

# Every adapter, at a release where its default path is correct.
ADAPTER_PINS = [
    "reference",
    "deepspeed==0.19.8",
    "verl==0.9.1",
]
# Slower kits (each ~1-2 min): run with -m slow.
SLOW_ADAPTER_PINS = ["openrlhf==0.11.2", "trl==1.16.0"]


@pytest.mark.framework
@pytest.mark.parametrize("pin_text", ADAPTER_PINS)
def test_adapter_conforms(pin_text: str, tmp_path: Path) -> None:
    pin = FrameworkPin("reference", None) if pin_text == "reference" else parse_pin(pin_text)
    checks = {c.name: c for c in run_conformance(pin, workdir=tmp_path)}
    assert set(checks) == {"unsupported", "init", "order", "pre-clip", "repeat", "zero-lr"}
    failed = {n: c.detail for n, c in checks.items() if c.passed is False}
    assert not failed, failed


@pytest.mark.framework
@pytest.mark.slow
@pytest.mark.parametrize("pin_text", SLOW_ADAPTER_PINS)
def test_adapter_conforms_slow(pin_text: str, tmp_path: Path) -> None:
    test_adapter_conforms(pin_text, tmp_path)


def test_conformance_catches_a_nonconforming_adapter(tmp_path: Path) -> None:
    """A gradient scaled by 1.01 passes nothing that compares gradients."""
    pin = FrameworkPin("faults", None)
    spec = S.from_dict({**S.to_dict(base_spec(pin)), "faults": {"mode": "scale", "scale": 1.01}})
    checks = {c.name: c for c in run_conformance(pin, spec, workdir=tmp_path)}
    assert checks["order"].passed is False
    assert checks["pre-clip"].passed is False
    assert checks["init"].passed is True  # the loss is untouched by this fault: the checks are independent
    assert checks["zero-lr"].passed is True
