"""Signatures: the shape of a divergence, recovered from numbers.

The reference records each micro-batch's contribution c_k to the step gradient (its share of the correctly
aggregated loss), so the correct gradient is sum_k c_k: every weight 1. Fitting a framework's gradient G as
sum_k w_k c_k (least squares over all parameters) recovers the weights the framework actually gave each micro-batch.
`describe` then names the weight pattern by comparing it with patterns computed from the token counts (dropped
micro-batches, per-micro-batch or per-rank token means, sums instead of means, a uniform scale). Nothing here knows
a framework or a version.

A contribution with (near-)zero norm (a GRPO micro-batch whose advantages are all 0, or whose completions are all
masked) has no identifiable weight: any weight explains the gradient equally well. Such contributions are marked
undetermined (weight NaN, listed in Fit.undetermined), left out of the solve and out of pattern naming, so they can
neither read as "dropped" on an agreeing run nor turn a uniform scale into an unnamed re-weighting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    undetermined: tuple[int, ...] = ()
    """Indices of contributions with (near-)zero norm: their weight is NaN (not identifiable from the gradient)."""

    @property
    def determined(self) -> list[int]:
        return [i for i in range(len(self.weights)) if i not in self.undetermined]


def fit_weights(grad: Mapping[str, torch.Tensor], contributions: Sequence[Mapping[str, torch.Tensor]],
                labels: Sequence[str] | None = None) -> Fit:
    """Least-squares weights w minimising ||G - sum_k w_k c_k|| over all parameters (float64, Gram form so real-size
    models need no K x P matrix). Contributions whose norm is at most UNDETERMINED_REL x the largest one are left out
    of the solve and get weight NaN (Fit.undetermined)."""
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
    norms = gram.diagonal().clamp(min=0).sqrt()
    largest = float(norms.max()) if k else 0.0
    keep = [i for i in range(k) if float(norms[i]) > UNDETERMINED_REL * largest]
    weights = [math.nan] * k
    res_sq = g_sq
    if keep:
        idx = torch.tensor(keep)
        sub, sub_rhs = gram[idx][:, idx], rhs[idx]
        # ridge of 1e-12 x trace keeps the solve defined when two contributions are (near) identical
        ridge = 1e-12 * float(sub.trace()) / len(keep)
        w = torch.linalg.solve(sub + ridge * torch.eye(len(keep), dtype=torch.float64), sub_rhs)
        res_sq = g_sq - 2 * float(w @ sub_rhs) + float(w @ sub @ w)
        for j, i in enumerate(keep):
            weights[i] = float(w[j])
    residual = math.sqrt(max(res_sq, 0.0) / g_sq) if g_sq > 0 else 0.0
    return Fit(tuple(weights), residual, tuple(labels or [f"mb {i}" for i in range(k)]),
               tuple(i for i in range(k) if i not in keep))


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
UNDETERMINED_REL = 1e-6
"""A contribution this small relative to the largest one has no identifiable weight."""


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
        "microbatch-token-mean-summed": ([n / (ws * c) if c else 0.0 for c in flat],
                                         "each micro-batch normalised by its own token count and summed over "
                                         "accumulation, not averaged (ranks averaged)"),
        "rank-token-mean": ([n / (ws * per_rank[r]) for r in range(ws) for _ in range(ga)],
                            "each rank normalised by its own token count, then averaged over ranks"),
        "microstep-token-mean": ([n / (ga * per_micro[m]) for _ in range(ws) for m in range(ga)],
                                 "each accumulation micro-step normalised by its token count across ranks, then "
                                 "averaged over micro-steps (ranks right, accumulation wrong)"),
    }
    return pats


def _priority(ws: int, ga: int) -> list[str]:
    """Which name wins when several patterns coincide: at one micro-batch per rank a per-micro-batch mean IS a
    per-rank mean (say so); at one rank a per-micro-step mean IS a per-micro-batch mean."""
    names = ["microbatch-token-mean", "microstep-token-mean", "rank-token-mean", "microbatch-token-mean-summed"]
    if ga == 1:
        names.remove("rank-token-mean")
        names.insert(0, "rank-token-mean")
    return names


def describe(fit: Fit, counts: Sequence[Sequence[int]]) -> Signature:
    """Name the fitted weight pattern. Uses only the numbers (weights, residual, token counts); undetermined
    contributions (zero norm) take no part in it and are named in the text."""
    sig = _describe(fit, counts)
    if fit.undetermined:
        which = ", ".join(fit.labels[i] for i in fit.undetermined)
        sig = Signature(sig.name, f"{sig.text}; {which}: no gradient contribution in the reference (weight "
                                  "undetermined, left out)", sig.max_deviation)
    return sig


def _describe(fit: Fit, counts: Sequence[Sequence[int]]) -> Signature:
    w = list(fit.weights)
    det = fit.determined
    if fit.residual > RESIDUAL_TOL:
        return Signature("unexplained", f"no re-weighting of micro-batches explains the gradient (residual "
                                        f"{fit.residual:.2g}): the error is inside micro-batches, not between them",
                         math.inf)
    if not det:
        return Signature("undetermined", "no micro-batch contributes to the reference gradient: no weight can be "
                                         "fitted", math.nan)

    def dev(p: Sequence[float], only: Sequence[int] | None = None) -> float:
        idx = det if only is None else only
        return max((abs(w[i] - p[i]) / max(abs(p[i]), 1.0) for i in idx), default=0.0)

    pats = candidate_patterns(counts)
    order = _priority(len(counts), len(counts[0]))
    if dev(pats["correct"][0]) <= WEIGHT_TOL:
        return Signature("correct", "weights match the correct aggregation", dev(pats["correct"][0]))
    zero = [i for i in det if abs(w[i]) < WEIGHT_TOL]
    live = [i for i in det if i not in zero]
    if zero and live:
        dropped = ", ".join(fit.labels[i] for i in zero)
        if dev(pats["correct"][0], live) <= WEIGHT_TOL:
            return Signature("dropped-microbatches", f"{dropped} got weight 0 (dropped); the others are correct",
                             dev(pats["correct"][0], live))
        # two bugs at once: some micro-batches dropped, the survivors weighted by a known wrong aggregation
        for name in order:
            if dev(pats[name][0], live) <= WEIGHT_TOL:
                return Signature(f"dropped-microbatches+{name}", f"{dropped} got weight 0 (dropped), and the others "
                                 f"follow {name}: {pats[name][1]}", dev(pats[name][0], live))
    matches = [name for name in order if dev(pats[name][0]) <= WEIGHT_TOL]
    if matches:
        best = matches[0]
        also = f" (here the same weights as {', '.join(matches[1:])})" if len(matches) > 1 else ""
        return Signature(best, pats[best][1] + also, dev(pats[best][0]))
    mean = sum(w[i] for i in det) / len(det)
    if all(abs(w[i] - mean) <= WEIGHT_TOL * max(abs(mean), 1.0) for i in det):
        return Signature("uniform-scale", f"every micro-batch weighted {mean:.4g}x: the whole gradient is scaled by "
                                          f"{mean:.4g}", max(abs(w[i] - mean) for i in det))
    return Signature("reweighted", "micro-batches re-weighted in a pattern none of the known aggregations explains: "
                                   + ", ".join(f"{fit.labels[i]} {w[i]:.3g}" for i in det),
                     dev(pats["correct"][0]))


@dataclass(frozen=True)
class TokenFinding:
    """The token-level fit: the weight each target token got, relative to a supervised token of its sample."""

    name: str
    """'correct', 'token-mask' (named mask differences), 'sample-weights' or 'unexplained'."""
    text: str
    residual: float
    relative: dict[int, dict[int, float]]
    """sample -> target position -> weight relative to the sample's typical supervised token."""


def token_fit(grad: Mapping[str, torch.Tensor], contributions: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
              supervised: Mapping[int, set[int]], prompt_len: Mapping[int, int],
              padding: Mapping[int, int] | None = None) -> TokenFinding:
    """Fit the gradient on per-token contributions and name mask differences shared by the samples.

    contributions[(sample, t)] is the gradient of target position t's loss at the weight a supervised token has in
    the correct aggregation, so correct weights are 1 on supervised targets and 0 on the others. padding[sample] is
    the position of a padding token predicted after the sample's last token, where its contribution is given (a
    framework that pads and shifts its mask the wrong way trains it).
    """
    keys = list(contributions)
    fit = fit_weights(grad, [contributions[k] for k in keys], [f"{s}:{t}" for s, t in keys])
    # a token whose contribution is zero has no identifiable weight: read it as 0 (it changes nothing either way)
    w = {k: (0.0 if math.isnan(x) else x) for k, x in zip(keys, fit.weights, strict=True)}
    relative: dict[int, dict[int, float]] = {}
    dropped: set[int] = set()
    sample_weight: dict[int, float] = {}
    for sample, sup in supervised.items():
        positions = sorted(t for s, t in keys if s == sample)
        inner = sorted(sup)[1:-1] or sorted(sup)
        base = sorted(w[(sample, t)] for t in inner)[len(inner) // 2]
        sample_weight[sample] = base
        if abs(base) < WEIGHT_TOL:  # the whole sample got (nearly) no weight: keep absolute weights
            dropped.add(sample)
            relative[sample] = {t: w[(sample, t)] for t in positions}
        else:
            relative[sample] = {t: w[(sample, t)] / base for t in positions}
    if fit.residual > RESIDUAL_TOL:
        text = (f"no per-token weighting explains the gradient (residual {fit.residual:.2g}): the error is in the "
                "forward or backward itself (attention mask, positions, ...), not in which tokens are trained")
        return TokenFinding("unexplained", text, fit.residual, relative)

    live = [s for s in relative if s not in dropped]

    def all_samples(pred: Any, which: Any) -> bool:
        vals = [pred(relative[s][which(s)]) for s in live if which(s) in relative[s]]
        return bool(vals) and all(vals)

    def near(x: float, target: float, tol: float = 0.05) -> bool:
        return abs(x - target) <= tol

    findings = []
    first = lambda s: prompt_len[s]  # noqa: E731 - the first response token's target position
    last = lambda s: max(supervised[s])  # noqa: E731 - the last supervised target (EOS)
    last_prompt = lambda s: prompt_len[s] - 1  # noqa: E731
    if all_samples(lambda x: near(x, 0.0), first):
        findings.append("first response token never trained")
    if all_samples(lambda x: near(x, 0.0), last):
        findings.append("last response token (EOS) never trained")
    if all_samples(lambda x: near(x, 1.0, 0.1), last_prompt) and any(prompt_len[s] >= 2 for s in relative):
        findings.append("last prompt token trained as a target")
    prompt_rel = [relative[s][t] for s in live for t in relative[s] if t < prompt_len[s] - 1]
    if prompt_rel and all(near(x, 1.0, 0.1) for x in prompt_rel):
        findings.append("prompt tokens trained (no completion-only mask)")
    pads = {s: relative[s][t] for s, t in (padding or {}).items() if s in live and t in relative[s]}
    padded = sorted(s for s, x in pads.items() if near(x, 1.0, 0.1))
    if padded and all(near(x, 0.0) or near(x, 1.0, 0.1) for x in pads.values()):
        # a sample that fills the padded length has no padding after it: only some samples may show this
        findings.append(f"padding after the last token trained as a target (samples {', '.join(map(str, padded))})")
    if findings:
        return TokenFinding("token-mask", "; ".join(findings), fit.residual, relative)
    uniform_inside = all(near(relative[s][t], 1.0) for s in live for t in supervised[s])
    clean_outside = all(near(relative[s][t], 0.0) for s in live for t in relative[s] if t not in supervised[s])
    silent = all(near(x, 0.0, WEIGHT_TOL) for s in dropped for x in relative[s].values())
    if uniform_inside and clean_outside and silent:
        per_sample = {s: 0.0 if s in dropped else sample_weight[s] for s in supervised}
        if all(near(v, 1.0, WEIGHT_TOL) for v in per_sample.values()):
            return TokenFinding("correct", "every supervised token weighted correctly, no other token trained",
                                fit.residual, relative)
        return TokenFinding("sample-weights", "the right tokens are trained, uniformly within each sample; sample "
                            "weights " + ", ".join(f"{s}: {v:.3g}" for s, v in sorted(per_sample.items())),
                            fit.residual, relative)
    return TokenFinding("reweighted", "tokens re-weighted in a pattern with no name", fit.residual, relative)
