"""Tolerances: dtype-aware and calibrated, never one magic number.

The bound on a relative error is max(dtype floor, safety x the reference's own error), where the reference's own
error is measured by running it once more in float64 and comparing. A user override (run.rel_tolerance) replaces
it. Every verdict carries the Bound it used, with a sentence saying where the number came from.

Why these numbers: on a 2-core CPU, correct framework paths agree with the reference to 1e-7..3e-6 relative in
fp32, and real bugs differ by 0.1..4; the fp32 floor of 1e-4 sits two decades above the first and three below the
second. bf16 carries ~1e-2 of rounding noise per run, so its safety factor is small and its floor is 5e-2.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOOR = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 5e-2}
SAFETY = {"float64": 100.0, "float32": 100.0, "bfloat16": 4.0}
CEILING = {"float64": 1e-6, "float32": 1e-2, "bfloat16": 0.2}
"""A calibrated bound above this means the reference disagrees with itself: the check is refused, never widened."""


class CalibrationError(Exception):
    """The reference's float64 run disagrees with its working-precision run by more than any rounding can explain."""


@dataclass(frozen=True)
class Bound:
    value: float
    """The largest relative error that still counts as agreement."""
    source: str
    """How the value was chosen, for the report."""
    reference_self_error: float | None = None
    """The reference's relative gradient error against its own float64 run (None when not measured)."""

    def update_bound(self, optimizer: str) -> float:
        """Adam's first update is ~lr*sign(g): rounding noise on tiny gradients flips signs, so updates get 10x."""
        return self.value if optimizer == "sgd" else max(10 * self.value, 1e-3)


def bound_for(dtype: str, reference_self_error: float | None, override: float = 0.0) -> Bound:
    if override > 0:
        return Bound(override, f"{override:.1e} (run.rel_tolerance override)", reference_self_error)
    floor, safety = FLOOR[dtype], SAFETY[dtype]
    if reference_self_error is None:
        return Bound(floor, f"{floor:.1e} ({dtype} floor; reference self-error not measured)")
    calibrated = safety * reference_self_error
    if calibrated > CEILING[dtype]:
        raise CalibrationError(
            f"the reference's {dtype} and float64 runs differ by {reference_self_error:.2g} (relative gradient error): "
            f"a bound of {calibrated:.2g} would pass anything; refusing to compare (set run.rel_tolerance to force)")
    if calibrated > floor:
        return Bound(calibrated, f"{calibrated:.1e} = {safety:g} x reference {dtype}-vs-float64 error "
                                 f"{reference_self_error:.1e} (above the {dtype} floor {floor:.0e})",
                     reference_self_error)
    return Bound(floor, f"{floor:.1e} ({dtype} floor; {safety:g} x reference {dtype}-vs-float64 error "
                        f"{reference_self_error:.1e} is below it)", reference_self_error)
