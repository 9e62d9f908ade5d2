"""Metamorphic properties: relations between a framework's own runs that must hold whatever the right answer is.

Each property turns one drawn configuration into a few variants that a correct framework must train identically
(or in a known relation), runs them all through the framework alone - no reference - and compares the records. So
they also test code paths the reference cannot express. Every property is selectable on its own
(`stepdiff fuzz --property NAME`) and usable from a test suite (`stepdiff.properties`).

- ga_invariance:  micro-batch size x accumulation held fixed (mbs=m*k, GA=1 vs mbs=m, GA=k): the same steps.
- dp_equals_ga:   world size 2 x GA g equals world size 1 x GA 2g on the same samples in the same order.
- permutation:    reordering the samples within each optimizer step changes nothing.
- padding:        padding every micro-batch with extra pad tokens (data.pad_to) changes nothing.
- zero_lr:        learning rate 0 leaves every parameter unchanged after every step.
- duplicate:      one sample added twice weighs twice: grad(S + x) = (N_S grad(S) + N_x grad(x)) / (N_S + N_x), N the
                  step normaliser's share (supervised tokens for token-mean, sequences for sequence means).
- noop:           changing a knob that should not change the math (ZeRO stage, offload, overlap_comm, bucket sizes,
                  sampler seed, ...) changes nothing.

Bounds: calibrated as `stepdiff run` calibrates them (the dtype floor, raised by the reference's own float32-vs-float64
error on the first variant: a measure of how much rounding the configuration's trajectory amplifies; a chaotic one is
'unjudged', counted apart) on gradients, the update bound on parameter updates; zero_lr allows a tenth of the floor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import data as D
from . import strategies as ST
from .diff import dict_diff, update_pair_diff
from .errors import UnsupportedError, UsageError, WorkerError
from .tolerance import FLOOR, bound_for

if TYPE_CHECKING:
    from .record import Record
    from .session import Session
    from .spec import Spec


@dataclass
class Outcome:
    """The verdict of one property on one configuration."""

    verdict: str
    """'hold', 'violated', 'error' (a run crashed, hung or produced NaN), 'unsupported' (a variant cannot run) or
    'unjudged' (the configuration's trajectory is chaotic: no bound can be calibrated for it)."""
    reason: str
    max_error: float | None = None
    """The largest relative difference found (gradients, updates or parameters)."""
    bound: float | None = None
    variants: list[tuple[str, Spec]] = field(default_factory=list)
    """(label, spec) of each run, in order."""
    errors: dict[str, float] = field(default_factory=dict)
    """What was compared -> its relative difference, e.g. 'step 0 gradients' -> 0.63."""

    @property
    def failing(self) -> bool:
        return self.verdict in ("violated", "error")


Variants = list[tuple[str, "Spec"]]


@dataclass(frozen=True)
class Property:
    name: str
    summary: str
    preset: Callable[[Any, ST.Space], dict[str, Any]]
    """Draws the dimensions the property controls (batching, lr) before the rest of the configuration."""
    variants: Callable[[Any, ST.Space, Spec, Mapping[str, Any]], Variants | str]
    """The runs to compare (the first is the drawn configuration), or why this configuration cannot be used."""
    relation: str
    """'equal' (every variant trains like the first), 'unchanged' (parameters stay at their initial values) or
    'duplicate' (the three-run weighting relation)."""
    needs: Callable[[ST.Space], str | None] = lambda space: None
    """Why the property cannot run against this adapter/space at all (a usage error), or None."""


_REGISTRY: dict[str, Property] = {}


def register_property(prop: Property) -> None:
    if prop.name in _REGISTRY:
        raise ValueError(f"property {prop.name!r} is already registered")
    _REGISTRY[prop.name] = prop


def property_names() -> list[str]:
    return list(_REGISTRY)


def get_property(name: str) -> Property:
    try:
        return _REGISTRY[name.replace("-", "_")]
    except KeyError:
        raise UsageError(f"unknown property {name!r}; known: {', '.join(_REGISTRY)}") from None


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _count(data: Any, label: str, lo: int, hi: int) -> int:
    from hypothesis import strategies as st

    return int(data.draw(st.integers(lo, max(lo, hi)), label=label))


def explicit(spec: Spec) -> Spec:
    """The spec with its samples written out (generated samples become explicit ones)."""
    return spec if spec.data.samples else spec.replace(data__samples=D.samples(spec))


def _no_preset(data: Any, space: ST.Space) -> dict[str, Any]:
    return {}


def _needs_ws2(space: ST.Space) -> str | None:
    if 2 not in ST.world_sizes(space.adapter, ST.Limits(max_world_size=2)):
        return f"{space.adapter} does not run at world size 2"
    return None


# --------------------------------------------------------------------------------------------------------------
# The properties


def _ga_preset(data: Any, space: ST.Space) -> dict[str, Any]:
    k = _count(data, "ga_invariance.grad_accum", 2, max(2, space.limits.max_grad_accum))
    m = _count(data, "ga_invariance.micro_batch_size", 1, 2)
    return {"batch.grad_accum": 1, "batch.micro_batch_size": m * k, "_k": k}


def _ga_variants(data: Any, space: ST.Space, spec: Spec, cfg: Mapping[str, Any]) -> Variants | str:
    mk = spec.batch.micro_batch_size
    k = int(cfg.get("_k", mk))
    spec = explicit(spec)
    other = spec.replace(batch__grad_accum=k, batch__micro_batch_size=mk // k)
    return [(f"micro_batch_size={mk}, grad_accum=1", spec),
            (f"micro_batch_size={mk // k}, grad_accum={k}", other)]


def _dp_preset(data: Any, space: ST.Space) -> dict[str, Any]:
    g = _count(data, "dp_equals_ga.grad_accum", 1, max(1, space.limits.max_grad_accum // 2))
    return {"batch.world_size": 2, "batch.grad_accum": g}


def _dp_variants(data: Any, space: ST.Space, spec: Spec, cfg: Mapping[str, Any]) -> Variants | str:
    spec = explicit(spec)
    g = spec.batch.grad_accum
    return [(f"world_size=2, grad_accum={g}", spec),
            (f"world_size=1, grad_accum={2 * g}", spec.replace(batch__world_size=1, batch__grad_accum=2 * g))]


def _perm_preset(data: Any, space: ST.Space) -> dict[str, Any]:
    return {"batch.grad_accum": _count(data, "permutation.grad_accum", 2, max(2, space.limits.max_grad_accum))}


def _perm_variants(data: Any, space: ST.Space, spec: Spec, cfg: Mapping[str, Any]) -> Variants | str:
    from hypothesis import strategies as st

    spec = explicit(spec)
    n = spec.samples_per_step
    smp = list(spec.data.samples)
    out = list(smp)
    moved = []
    for s in range(spec.batch.steps):
        perm = list(data.draw(st.permutations(range(n)), label=f"permutation.step{s}"))
        if perm == sorted(perm):  # the identity tests nothing: rotate by one instead
            perm = perm[1:] + perm[:1]
        moved.append(perm)
        for j, src in enumerate(perm):
            out[s * n + j] = smp[s * n + src]
    return [("samples in case order", spec),
            (f"samples permuted within each step: {moved}", spec.replace(data__samples=tuple(out)))]


def _pad_variants(data: Any, space: ST.Space, spec: Spec, cfg: Mapping[str, Any]) -> Variants | str:
    spec = explicit(spec)
    longest = max(len(s.prompt) + max(len(s.response), len(s.rejected)) for s in spec.data.samples)
    extra = _count(data, "padding.extra", 1, 16)
    pad_to = longest + extra
    padded = spec.replace(data__pad_to=pad_to, model__max_position_embeddings=max(
        spec.model.max_position_embeddings, pad_to))
    unpadded = spec.replace(model__max_position_embeddings=padded.model.max_position_embeddings)
    return [("each micro-batch padded to its longest sample", unpadded),
            (f"every micro-batch padded to {pad_to} tokens", padded)]


def _zero_lr_preset(data: Any, space: ST.Space) -> dict[str, Any]:
    return {"optimizer.lr": 0.0}


def _zero_lr_variants(data: Any, space: ST.Space, spec: Spec, cfg: Mapping[str, Any]) -> Variants | str:
    return [("optimizer.lr = 0", explicit(spec))]


def _dup_preset(data: Any, space: ST.Space) -> dict[str, Any]:
    n = _count(data, "duplicate.grad_accum", 2, max(2, space.limits.max_grad_accum))
    return {"batch.world_size": 1, "batch.micro_batch_size": 1, "batch.steps": 1, "batch.grad_accum": n}


def _dup_variants(data: Any, space: ST.Space, spec: Spec, cfg: Mapping[str, Any]) -> Variants | str:
    spec = explicit(spec)
    if spec.loss.kind == "policy" and spec.rl.advantage != "given":
        return "duplicate: group-normalised advantages change when a sample is added"
    if spec.loss.aggregation == "seq-mean-token-sum-norm" and spec.rl.max_response_len == 0:
        return "duplicate: seq-mean-token-sum-norm with rl.max_response_len = 0 normalises by the step's longest"
    n = spec.batch.grad_accum
    smp = list(spec.data.samples[:n])
    i = _count(data, "duplicate.sample", 0, n - 1)
    pos = _count(data, "duplicate.position", 0, n)
    if not D.included(spec, smp[i]) or D.token_count(spec, smp[i]) == 0:
        return "duplicate: the duplicated sample takes no part in the loss"
    alone = spec.replace(batch__grad_accum=1, data__samples=(smp[i],))
    both = spec.replace(batch__grad_accum=n + 1, data__samples=(*smp[:pos], smp[i], *smp[pos:]))
    return [(f"{n} samples", spec.replace(data__samples=tuple(smp))), (f"sample {i} alone", alone),
            (f"{n} samples + sample {i} again at position {pos}", both)]


def _noop_knobs(space: ST.Space) -> list[tuple[str, tuple[Any, ...]]]:
    out = []
    for dim in space.active:
        section, _, knob = dim.partition(".")
        if section == space.adapter:
            domain = ST.knob_domain(space.adapter, knob, ST.base_value(space.base, dim, space.adapter),
                                    space.version, space.extra_pins)
            if len(domain) > 1:
                out.append((knob, domain))
    return out


def _noop_needs(space: ST.Space) -> str | None:
    if not _noop_knobs(space):
        return f"noop: {space.adapter} has no knob with two values to switch between (or --vary/--fix left none)"
    return None


def _noop_variants(data: Any, space: ST.Space, spec: Spec, cfg: Mapping[str, Any]) -> Variants | str:
    import dataclasses

    from hypothesis import strategies as st

    knobs = _noop_knobs(space)
    knob, domain = knobs[_count(data, "noop.knob", 0, len(knobs) - 1)]
    current = getattr(spec.knobs_for(space.adapter), knob)
    alt = data.draw(st.sampled_from([v for v in domain if v != current]), label="noop.value")
    spec = explicit(spec)
    table = dataclasses.replace(spec.knobs_for(space.adapter), **{knob: alt})
    other = spec.replace(knobs={**spec.knobs, space.adapter: table})
    return [(f"{space.adapter}.{knob} = {current!r}", spec), (f"{space.adapter}.{knob} = {alt!r}", other)]


for _p in (
    Property("ga_invariance", "micro-batch size x gradient accumulation held fixed gives the same steps",
             _ga_preset, _ga_variants, "equal"),
    Property("dp_equals_ga", "world size 2 x GA g equals world size 1 x GA 2g on the same samples",
             _dp_preset, _dp_variants, "equal", _needs_ws2),
    Property("permutation", "reordering samples within an optimizer step changes nothing",
             _perm_preset, _perm_variants, "equal"),
    Property("padding", "extra pad tokens (data.pad_to) change nothing", _no_preset, _pad_variants, "equal"),
    Property("zero_lr", "learning rate 0 leaves every parameter unchanged", _zero_lr_preset, _zero_lr_variants,
             "unchanged"),
    Property("duplicate", "a sample added twice weighs twice (three-run linear relation)", _dup_preset,
             _dup_variants, "duplicate"),
    Property("noop", "switching a knob that should not change the math (ZeRO stage, offload, overlap_comm, ...) "
             "changes nothing", _no_preset, _noop_variants, "equal", _noop_needs),
):
    register_property(_p)


# --------------------------------------------------------------------------------------------------------------
# Checking


def preset(prop: Property, data: Any, space: ST.Space) -> dict[str, Any]:
    """The property's own draws, as configuration dimensions (private keys start with '_')."""
    return prop.preset(data, space)


def build(prop: Property, data: Any, space: ST.Space, cfg: Mapping[str, Any]) -> Variants | str:
    """The variants of a drawn configuration (or why it cannot be used)."""
    spec = ST.apply(space, public_config(cfg))
    return prop.variants(data, space, spec, cfg)


def public_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration without the property's private draws (keys starting with '_')."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _finite(spec: Spec, rec: Record, label: str) -> None:
    import math

    import torch

    if len(rec.steps) != spec.batch.steps:
        raise WorkerError(f"{label}: record has {len(rec.steps)} optimizer steps, the spec asked for "
                          f"{spec.batch.steps}")
    for s, st in enumerate(rec.steps):
        for kind, tensors in (("gradient", st.grads), ("parameter", st.params)):
            if not tensors:
                raise WorkerError(f"{label}: step {s}: no {kind}s recorded")
            bad = [n for n, t in tensors.items() if not bool(torch.isfinite(t).all())]
            if bad:
                raise WorkerError(f"{label}: step {s}: {kind} {bad[0]} contains NaN/Inf")
        if not math.isfinite(st.loss):
            raise WorkerError(f"{label}: step {s}: non-finite loss ({st.loss})")


def check(prop: Property, session: Session, variants: Variants) -> Outcome:
    """Run every variant through the session's framework and judge the relation."""
    first = variants[0][1]
    for label, spec in variants:
        reason = session.unsupported(spec)
        if reason:
            return Outcome("unsupported", f"{label}: {reason}", variants=variants)
    bound = _calibrated(session, first)
    if isinstance(bound, str):
        return Outcome("unjudged", bound, variants=variants)
    records = []
    try:
        for label, spec in variants:
            from .envs import cache_root
            from .model import write_init_weights

            rec = session.framework(spec, write_init_weights(spec, cache_root() / "init"))
            _finite(spec, rec, label)
            records.append(rec)
    except UnsupportedError as e:  # the installed release refused a knob inside its worker
        return Outcome("unsupported", e.message, variants=variants)
    except WorkerError as e:
        return Outcome("error", e.message, variants=variants, bound=bound.value)
    init = session.init_tensors(first)
    if prop.relation == "unchanged":
        return _unchanged(variants, records, init)
    if prop.relation == "duplicate":
        return _duplicate(variants, records, bound.value)
    return _equal(variants, records, init, bound.value, bound.update_bound(first.optimizer.name))


def _calibrated(session: Session, spec: Spec) -> Any:
    """The bound for comparing two runs of `spec`'s configuration: the dtype floor, raised like `stepdiff run`'s by
    the reference's own float32-vs-float64 error (a conditioning measure of the trajectory, not a verdict). A
    configuration whose trajectory is chaotic (the reference disagrees with itself past the ceiling) cannot be judged:
    returns the reason. Where the reference cannot run the spec, the floor."""
    from .envs import cache_root
    from .model import write_init_weights
    from .tolerance import CalibrationError

    try:
        return session.reference(spec, write_init_weights(spec, cache_root() / "init"))[1]
    except CalibrationError as e:
        return f"not judged: {e}"
    except WorkerError:
        return bound_for(spec.model.dtype, None, spec.run.rel_tolerance)


def _equal(variants: Variants, records: Sequence[Record], init: Mapping[str, Any], bound: float,
           update_bound: float) -> Outcome:
    errors: dict[str, float] = {}
    failures = []
    base_label, base = variants[0][0], records[0]
    for (label, _), rec in zip(variants[1:], records[1:], strict=True):
        before_a, before_b = init, init
        for s, (a, b) in enumerate(zip(base.steps, rec.steps, strict=True)):
            g = dict_diff(b.grads, a.grads)
            # updates beyond what storing the parameters in the run's precision can do (diff.update_pair_diff)
            u = update_pair_diff(a.params, before_a, b.params, before_b, variants[0][1].model.dtype)
            before_a, before_b = a.params, b.params
            errors[f"{label}: step {s} gradients"] = g.total.rel
            errors[f"{label}: step {s} updates"] = u.total.rel
            if g.total.rel > bound:
                worst = g.per_param[0] if g.per_param else None
                failures.append(f"step {s} gradients differ by {g.total.rel:.3g} > {bound:.1e}"
                                + (f" (worst {worst.name}: {worst.rel:.3g})" if worst else ""))
            elif u.total.rel > update_bound:
                failures.append(f"step {s} updates differ by {u.total.rel:.3g} > {update_bound:.1e}")
        if failures:
            return Outcome("violated", f"'{label}' vs '{base_label}': {failures[0]}", max(errors.values()), bound,
                           list(variants), errors)
    top = max(errors.values(), default=0.0)
    return Outcome("hold", f"all variants agree (max relative difference {top:.2g} <= {bound:.1e})", top, bound,
                   list(variants), errors)


def _unchanged(variants: Variants, records: Sequence[Record], init: Mapping[str, Any]) -> Outcome:
    (label, spec), rec = variants[0], records[0]
    bound = FLOOR[spec.model.dtype] / 10
    errors = {}
    for s, st in enumerate(rec.steps):
        d = dict_diff(st.params, init)
        errors[f"step {s} parameters vs initial"] = d.total.rel
        if d.total.rel > bound:
            worst = d.per_param[0] if d.per_param else None
            return Outcome("violated", f"{label}: parameters moved by {d.total.rel:.3g} (relative) after step {s} > "
                           f"{bound:.1e}" + (f"; worst {worst.name}: {worst.rel:.3g}" if worst else ""),
                           d.total.rel, bound, list(variants), errors)
    top = max(errors.values(), default=0.0)
    return Outcome("hold", f"parameters unchanged (max relative change {top:.2g} <= {bound:.1e})", top, bound,
                   list(variants), errors)


def _weight(spec: Spec) -> float:
    """A step's share of the normaliser: supervised tokens (token-mean) or sequences (sequence means, DPO)."""
    norms = D.step_norms(spec, 0)
    if spec.loss.kind == "dpo" or spec.loss.aggregation != "token-mean":
        return float(norms.sequences)
    return float(norms.tokens)


def _duplicate(variants: Variants, records: Sequence[Record], bound: float) -> Outcome:
    (_, s_spec), (_, x_spec), (label, both_spec) = variants
    gs, gx, gb = (r.steps[0].grads for r in records)
    ws, wx = _weight(s_spec), _weight(x_spec)
    expected = {n: (ws * gs[n].double() + wx * gx[n].double()) / (ws + wx) for n in gs}
    d = dict_diff(gb, expected)
    errors = {"step 0 gradients vs (N_S grad(S) + N_x grad(x)) / (N_S + N_x)": d.total.rel}
    if d.total.rel > bound:
        return Outcome("violated", f"'{label}': gradient differs from the weighted combination of '{variants[0][0]}' "
                       f"and '{variants[1][0]}' (weights {ws:g}, {wx:g}) by {d.total.rel:.3g} > {bound:.1e}",
                       d.total.rel, bound, list(variants), errors)
    return Outcome("hold", f"duplicate weighs twice (relative difference {d.total.rel:.2g} <= {bound:.1e})",
                   d.total.rel, bound, list(variants), errors)
