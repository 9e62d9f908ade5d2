"""Tolerances: dtype-aware and calibrated, never one magic number.

Every bound is max(dtype floor, safety x the reference's own error), where the reference's own error is measured by
running it once more in float64 from the same parameters (teacher forced, so multi-step low precision measures
rounding, not trajectory drift) and comparing:
- gradients, over all parameters and per parameter: the reference's working-precision gradient against float64;
- micro-batch weights: the reference's working-precision gradient fitted on the float64 per-micro-batch
  contributions (a systematic error such as a 2 % scale moves these weights far above rounding noise, even in bf16);
- updates and optimizer state: the reference's own optimizer step (torch's, on float32 master weights in low
  precision) against the spec's optimizer written out in float64 from the same parameters and gradients, forgiving
  parameter rounding (see diff.update_diff).
A user override (run.rel_tolerance, run.update_tolerance) replaces a bound. Every verdict carries the Bound it used,
with sentences saying where each number came from.

Why these numbers: on a 2-core CPU, correct framework paths agree with the reference to 1e-7..3e-6 relative in
fp32, and real bugs differ by 0.1..4; the fp32 floor of 1e-4 sits two decades above the first and three below the
second. bf16 gradients carry ~6e-3 (per parameter up to ~1.2e-2) of rounding error against float64; a correct bf16
framework carries its own, so the bf16 safety factor is small (2.5) and its floor (3e-3) sits below any measured
self-error: the calibration, not the floor, sets the bf16 bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FLOOR = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 3e-3, "float16": 1e-3}
SAFETY = {"float64": 100.0, "float32": 100.0, "bfloat16": 2.5, "float16": 4.0}
CEILING = {"float64": 1e-6, "float32": 1e-2, "bfloat16": 0.2, "float16": 0.1}
"""A calibrated bound above this means the reference disagrees with itself: the check is refused, never widened."""

UPDATE_FLOOR = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 1e-2, "float16": 5e-3}
"""Updates are compared beyond parameter rounding (diff.update_diff), so what is left is optimizer arithmetic: the
same floors as gradients in fp32; in low precision the floor covers frameworks that keep optimizer state in bf16."""
UPDATE_SAFETY = {"float64": 100.0, "float32": 100.0, "bfloat16": 4.0, "float16": 4.0}

WEIGHT_FLOOR = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 4e-3, "float16": 2e-3}
"""Bound on |fitted micro-batch weight - 1| for a correct run: rounding noise averages out in the fit."""
WEIGHT_SAFETY = {"float64": 100.0, "float32": 100.0, "bfloat16": 4.0, "float16": 4.0}


class CalibrationError(Exception):
    """The reference's float64 run disagrees with its working-precision run by more than any rounding can explain."""


@dataclass(frozen=True)
class Bound:
    value: float
    """The largest relative gradient error (over all parameters) that still counts as agreement."""
    source: str
    """How the value was chosen, for the report."""
    reference_self_error: float | None = None
    """The reference's relative gradient error against its own float64 run (None when not measured)."""
    per_param: Mapping[str, float] = field(default_factory=dict)
    """Calibrated per-parameter gradient bounds (`value` for parameters not listed)."""
    update: float = 0.0
    """The largest relative update / optimizer-state error beyond parameter rounding (0 = not calibrated: use
    `value`)."""
    update_source: str = ""
    reference_update_error: float | None = None
    weights: float = 0.0
    """The largest |fitted micro-batch weight - 1| of a correct run (0 = not checked)."""
    weights_source: str = ""

    def param_bound(self, name: str) -> float:
        return self.per_param.get(name, self.value)

    def update_bound(self, optimizer: str = "") -> float:
        """The update / optimizer-state bound."""
        return self.update or self.value


def _pick(dtype: str, self_error: float | None, floor: Mapping[str, float], safety: Mapping[str, float],
          what: str) -> tuple[float, str]:
    f, k = floor[dtype], safety[dtype]
    if self_error is None:
        return f, f"{f:.1e} ({dtype} floor; reference {what} not measured)"
    calibrated = k * self_error
    if calibrated > f:
        return calibrated, f"{calibrated:.1e} = {k:g} x reference {dtype}-vs-float64 {what} {self_error:.1e} " \
                           f"(above the {dtype} floor {f:.0e})"
    return f, f"{f:.1e} ({dtype} floor; {k:g} x reference {dtype}-vs-float64 {what} {self_error:.1e} is below it)"


def bound_for(dtype: str, reference_self_error: float | None, override: float = 0.0, *,
              per_param_self_error: Mapping[str, float] | None = None, update_self_error: float | None = None,
              update_override: float = 0.0, weight_self_error: float | None = None) -> Bound:
    """The bounds of one case. Self-errors are the reference's own working-precision-vs-float64 errors."""
    if reference_self_error is not None and SAFETY[dtype] * reference_self_error > CEILING[dtype] \
            and override <= 0:
        raise CalibrationError(
            f"the reference's {dtype} and float64 runs differ by {reference_self_error:.2g} (relative gradient error): "
            f"a bound of {SAFETY[dtype] * reference_self_error:.2g} would pass anything; refusing to compare "
            "(set run.rel_tolerance to force)")
    if override > 0:
        value, source = override, f"{override:.1e} (run.rel_tolerance override)"
        per_param: dict[str, float] = {}
    else:
        value, source = _pick(dtype, reference_self_error, FLOOR, SAFETY, "gradient error")
        per_param = {n: max(FLOOR[dtype], SAFETY[dtype] * e, value) for n, e in (per_param_self_error or {}).items()}
    if update_override > 0:
        update, update_source = update_override, f"{update_override:.1e} (run.update_tolerance override)"
    else:
        update, update_source = _pick(dtype, update_self_error, UPDATE_FLOOR, UPDATE_SAFETY,
                                      "update error beyond parameter rounding")
    weights, weights_source = 0.0, ""  # uncalibrated (no float64 contributions): the weight check is off
    if weight_self_error is not None:
        weights, weights_source = _pick(dtype, weight_self_error, WEIGHT_FLOOR, WEIGHT_SAFETY,
                                        "micro-batch weight deviation")
    return Bound(value, source, reference_self_error, per_param, update, update_source, update_self_error,
                 weights, weights_source)


def bound_to_dict(b: Bound) -> dict[str, Any]:
    """A Bound as JSON-friendly values (the reference cache stores it next to the record)."""
    return {"bound": b.value, "bound_source": b.source, "self_error": b.reference_self_error,
            "per_param": dict(b.per_param), "update": b.update, "update_source": b.update_source,
            "update_error": b.reference_update_error, "weights": b.weights, "weights_source": b.weights_source}


def bound_from_dict(v: Mapping[str, Any]) -> Bound:
    def num(key: str) -> float | None:
        x = v.get(key)
        return None if x is None else float(x)

    per = v.get("per_param") or {}
    return Bound(float(v["bound"]), str(v["bound_source"]), num("self_error"),
                 {str(k): float(x) for k, x in per.items()}, float(v.get("update") or 0.0),
                 str(v.get("update_source") or ""), num("update_error"), float(v.get("weights") or 0.0),
                 str(v.get("weights_source") or ""))
