"""The diff engine: tensors against tensors. Knows nothing of frameworks.

Relative Frobenius error ||a - r|| / ||r||, max abs error and cosine, per parameter and over all parameters at once.
Per-parameter relative errors are guarded: the denominator is at least a small fraction of the RMS parameter-tensor
norm, so a parameter whose reference gradient is (nearly) zero cannot turn rounding noise into a huge ratio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GUARD = 1e-3
"""Per-parameter denominators are at least GUARD x the RMS per-tensor reference norm."""


@dataclass(frozen=True)
class TensorDiff:
    name: str
    rel: float
    """||a - ref|| / max(||ref||, guard)."""
    max_abs: float
    cosine: float
    ref_norm: float
    norm: float


def _cos(dot: float, na: float, nr: float) -> float:
    if na == 0.0 and nr == 0.0:
        return 1.0
    if na == 0.0 or nr == 0.0:
        return 0.0
    return dot / (na * nr)


def tensor_diff(name: str, a: torch.Tensor, ref: torch.Tensor, guard: float = 0.0) -> TensorDiff:
    a64, r64 = a.detach().double().reshape(-1), ref.detach().double().reshape(-1)
    d = a64 - r64
    na, nr, nd = float(a64.norm()), float(r64.norm()), float(d.norm())
    denom = max(nr, guard)
    rel = nd / denom if denom > 0 else (0.0 if nd == 0 else math.inf)
    return TensorDiff(name, rel, float(d.abs().max()) if d.numel() else 0.0, _cos(float(a64 @ r64), na, nr), nr, na)


@dataclass(frozen=True)
class DictDiff:
    total: TensorDiff
    """All parameters as one vector."""
    per_param: tuple[TensorDiff, ...]
    """Per parameter, worst (largest rel) first."""
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


def _stats(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float, float, float]:
    """(||a||, ||ref||, ||a - ref||, max |a - ref|, a . ref) in float64, converting each tensor once."""
    a64, r64 = a.detach().double().reshape(-1), ref.detach().double().reshape(-1)
    d = a64 - r64
    return (float(a64.norm()), float(r64.norm()), float(d.norm()), float(d.abs().max()) if d.numel() else 0.0,
            float(a64 @ r64))


def dict_diff(a: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> DictDiff:
    names = [n for n in ref if n in a]
    missing = tuple(n for n in ref if n not in a)
    unexpected = tuple(n for n in a if n not in ref)
    bad_shape = [n for n in names if a[n].shape != ref[n].shape]
    # one float64 pass per tensor (the engine's cost at real size is memory traffic, not arithmetic)
    stats = {n: _stats(a[n], ref[n]) for n in names if n not in bad_shape}
    sq_ref = sum(float(ref[n].double().norm()) ** 2 for n in bad_shape) + sum(s[1] ** 2 for s in stats.values())
    rms = math.sqrt(sq_ref / max(len(names), 1))
    guard = GUARD * rms
    per = []
    for n, (na, nr, nd, max_abs, dot_n) in stats.items():
        denom = max(nr, guard)
        rel = nd / denom if denom > 0 else (0.0 if nd == 0 else math.inf)
        per.append(TensorDiff(n, rel, max_abs, _cos(dot_n, na, nr), nr, na))
    sq_d = sum(s[2] ** 2 for s in stats.values())
    sq_a = sum(s[0] ** 2 for s in stats.values())
    dot = sum(s[4] for s in stats.values())
    total = TensorDiff("*", math.sqrt(sq_d) / math.sqrt(sq_ref) if sq_ref > 0 else (0.0 if sq_d == 0 else math.inf),
                       max((p.max_abs for p in per), default=0.0), _cos(dot, math.sqrt(sq_a), math.sqrt(sq_ref)),
                       math.sqrt(sq_ref), math.sqrt(sq_a))
    return DictDiff(total, tuple(sorted(per, key=lambda p: -p.rel)), missing + tuple(bad_shape), unexpected)


def scalar_rel(a: float | None, ref: float | None) -> float | None:
    """|a - ref| / |ref| (None when either is missing)."""
    if a is None or ref is None or (isinstance(a, float) and math.isnan(a)):
        return None
    if ref == 0:
        return 0.0 if a == 0 else math.inf
    return abs(a - ref) / abs(ref)


def subtract(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: a[n].double() - b[n].double() for n in a if n in b}


MANTISSA_BITS = {"float64": 52, "float32": 23, "bfloat16": 7, "float16": 10}


def ulp(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """The spacing of `dtype`'s numbers at each element of `t` (float64; 0 where t is 0)."""
    import torch

    x = t.detach().double()
    _, e = torch.frexp(x)
    out = torch.ldexp(torch.ones_like(x), (e - 1 - MANTISSA_BITS[dtype]))
    return torch.where(x == 0, torch.zeros_like(x), out)


def update_diff(after: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                before: Mapping[str, torch.Tensor], dtype: str) -> DictDiff:
    """A framework's update (after - before) against the expected one (expected - before), forgiving what rounding
    the parameters to `dtype` can do: a framework stores round(master) (or rounds p + update), so each of `before`
    and `after` may be off the exact value by half a unit in the last place. Only the part of the difference beyond
    that allowance counts; the result reads like any DictDiff (relative to the expected update)."""
    fw, exp = {}, {}
    for n in expected:
        if n not in after or n not in before or after[n].shape != expected[n].shape:
            continue
        b = before[n].double()
        e = expected[n].double() - b
        d = after[n].double() - expected[n].double()
        allow = 0.5 * (ulp(after[n], dtype) + ulp(before[n], dtype))
        excess = d.sign() * (d.abs() - allow).clamp(min=0)
        fw[n], exp[n] = e + excess, e
    return dict_diff(fw, exp)


def update_pair_diff(a_after: Mapping[str, torch.Tensor], a_before: Mapping[str, torch.Tensor],
                     b_after: Mapping[str, torch.Tensor], b_before: Mapping[str, torch.Tensor],
                     dtype: str) -> DictDiff:
    """Run b's update against run a's (both stored in `dtype`), forgiving half a unit in the last place of each of
    the four parameter tensors (what storing parameters can do to an update), like `update_diff`."""
    fw, ref = {}, {}
    for n in a_after:
        if n not in a_before or n not in b_after or n not in b_before or a_after[n].shape != b_after[n].shape:
            continue
        ua = a_after[n].double() - a_before[n].double()
        d = (b_after[n].double() - b_before[n].double()) - ua
        allow = 0.5 * (ulp(a_after[n], dtype) + ulp(a_before[n], dtype) + ulp(b_after[n], dtype)
                       + ulp(b_before[n], dtype))
        fw[n], ref[n] = ua + d.sign() * (d.abs() - allow).clamp(min=0), ua
    return dict_diff(fw, ref)
