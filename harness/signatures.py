"""Signatures: the shape of a divergence, recovered from numbers.

The reference records each micro-batch's contribution c_k to the step gradient (its share of the correctly
aggregated loss), so the correct gradient is sum_k c_k: every weight 1. Fitting a framework's gradient G as
sum_k w_k c_k (least squares over all parameters) recovers the weights the framework actually gave each micro-batch.
`describe` then names the weight pattern by comparing it with patterns computed from the token counts (dropped
micro-batches, per-micro-batch or per-rank token means, sums instead of means, a uniform scale). Nothing here knows
a framework or a version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Fit:
    weights: tuple[float, ...]
    """Fitted weight of each contribution, relative to the correct weight (1.0 = correct)."""
    residual: float
    """||G - sum w_k c_k|| / ||G||: how much of the gradient no re-weighting explains."""
    labels: tuple[str, ...]
    """Which contribution each weight belongs to, e.g. 'rank 0 mb 2'."""


def fit_weights(grad: Mapping[str, torch.Tensor], contributions: Sequence[Mapping[str, torch.Tensor]],
                labels: Sequence[str] | None = None) -> Fit:
    """Least-squares weights w minimising ||G - sum_k w_k c_k|| over all parameters (float64, Gram form so real-size
    models need no K x P matrix)."""
    import torch

    k = len(contributions)
    gram = torch.zeros((k, k), dtype=torch.float64)
    rhs = torch.zeros(k, dtype=torch.float64)
    g_sq = 0.0
    for name, g in grad.items():
        cs = torch.stack([c[name].double().reshape(-1) for c in contributions])  # K x n
        gv = g.double().reshape(-1)
        gram += cs @ cs.T
        rhs += cs @ gv
        g_sq += float(gv @ gv)
    # ridge of 1e-12 x trace keeps the solve defined when two contributions are (near) identical
    ridge = 1e-12 * float(gram.trace()) / max(k, 1)
    w = torch.linalg.solve(gram + ridge * torch.eye(k, dtype=torch.float64), rhs)
    res_sq = g_sq - 2 * float(w @ rhs) + float(w @ gram @ w)
    residual = math.sqrt(max(res_sq, 0.0) / g_sq) if g_sq > 0 else 0.0
    return Fit(tuple(float(x) for x in w), residual, tuple(labels or [f"mb {i}" for i in range(k)]))


@dataclass(frozen=True)
class Signature:
    name: str
    """Short id: 'correct', 'dropped-microbatches', 'microbatch-token-mean', ... or 'unexplained'."""
    text: str
    """One sentence for the report."""
    max_deviation: float
    """Largest |w - pattern| / max(|pattern|, 1) between the fit and the named pattern."""


WEIGHT_TOL = 0.02
RESIDUAL_TOL = 0.02


def candidate_patterns(counts: Sequence[Sequence[int]]) -> dict[str, tuple[list[float], str]]:
    """Weight patterns (relative to correct) that known aggregation mistakes produce, from token counts.

    counts[r][m] = supervised tokens of micro-batch m on rank r. Correct weights are 1 for token-mean aggregation.
    """
    ws, ga = len(counts), len(counts[0])
    n = sum(sum(r) for r in counts)
    flat = [c for r in counts for c in r]
    k = ws * ga
    per_rank = [sum(r) for r in counts]
    per_micro = [sum(counts[r][m] for r in range(ws)) for m in range(ga)]
    pats: dict[str, tuple[list[float], str]] = {
        "correct": ([1.0] * k, "every micro-batch weighted by its tokens (one token mean over the step)"),
        "microbatch-token-mean": ([n / (k * c) if c else 0.0 for c in flat],
                                  "each micro-batch normalised by its own token count, then averaged over "
                                  "micro-batches "
                                  "and ranks (mean of means): short micro-batches up-weighted"),
        "microbatch-token-mean-summed": ([n / c if c else 0.0 for c in flat],
                                         "each micro-batch normalised by its own token count and summed, not averaged"),
        "rank-token-mean": ([n / (ws * per_rank[r]) for r in range(ws) for _ in range(ga)],
                            "each rank normalised by its own token count, then averaged over ranks"),
        "microstep-token-mean": ([n / (ga * per_micro[m]) for _ in range(ws) for m in range(ga)],
                                 "each accumulation micro-step normalised by its token count across ranks, then "
                                 "averaged over micro-steps (ranks right, accumulation wrong)"),
    }
    return pats


def describe(fit: Fit, counts: Sequence[Sequence[int]]) -> Signature:
    """Name the fitted weight pattern. Uses only the numbers (weights, residual, token counts)."""
    w = list(fit.weights)
    if fit.residual > RESIDUAL_TOL:
        return Signature("unexplained", f"no re-weighting of micro-batches explains the gradient (residual "
                                        f"{fit.residual:.2g}): the error is inside micro-batches, not between them",
                         math.inf)

    def dev(p: Sequence[float]) -> float:
        return max(abs(a - b) / max(abs(b), 1.0) for a, b in zip(w, p, strict=True))

    pats = candidate_patterns(counts)
    if dev(pats["correct"][0]) <= WEIGHT_TOL:
        return Signature("correct", "weights match the correct aggregation", dev(pats["correct"][0]))
    # dropped micro-batches: every weight ~0 or ~1
    near = [0.0 if abs(x) < WEIGHT_TOL else 1.0 if abs(x - 1) < WEIGHT_TOL else None for x in w]
    if all(v is not None for v in near) and any(v == 0.0 for v in near):
        dropped = [fit.labels[i] for i, v in enumerate(near) if v == 0.0]
        return Signature("dropped-microbatches", f"{', '.join(dropped)} got weight 0 (dropped); the others are correct",
                         dev([v or 0.0 for v in near]))
    best = min((name for name in pats if name != "correct"), key=lambda nm: dev(pats[nm][0]))
    if dev(pats[best][0]) <= WEIGHT_TOL and pats[best][0] != pats["correct"][0]:
        return Signature(best, pats[best][1], dev(pats[best][0]))
    mean = sum(w) / len(w)
    if all(abs(x - mean) <= WEIGHT_TOL * max(abs(mean), 1.0) for x in w):
        return Signature("uniform-scale", f"every micro-batch weighted {mean:.4g}x: the whole gradient is scaled by "
                                          f"{mean:.4g}", max(abs(x - mean) for x in w))
    return Signature("reweighted", "micro-batches re-weighted in a pattern none of the known aggregations explains: "
                                   + ", ".join(f"{lab} {x:.3g}" for lab, x in zip(fit.labels, w, strict=True)),
                     dev(pats["correct"][0]))
