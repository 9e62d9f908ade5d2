"""Hypothesis strategies over the whole step spec, constrained by one adapter's capabilities.

A drawn configuration is a dict of dotted dimension names ('batch.grad_accum', 'optimizer.name',
'deepspeed.offload_optimizer', 'data.samples', ...) to values; `apply` lays it over a base case and validates the
result like a case file. Each dimension's domain comes from the adapter, read through the registry only:
its capabilities (dtypes, optimizers, world sizes) and its knob dataclass (Literal choices, booleans, small integer
ranges), narrowed by an optional `fuzz_knobs` class attribute ({knob: values}, the first the default; `()` = never
varied, e.g. a read-out that needs special optimizer settings).

Shrinking: counts (world size, accumulation, micro-batch size, steps, prompt/response lengths) shrink toward the
smallest; choices (dtype, optimizer, clipping, every knob) toward the base case's value, so the minimal failing
configuration differs from its base as little as the failure allows (and choices keep the base value 3/4 of the
time). World size is drawn before accumulation so that a failure reachable either way shrinks to one rank.

bfloat16 draws take one optimizer step: the reference updates bf16 weights while mixed-precision frameworks keep
fp32 master weights, so from the second step on the two trajectories differ by more than the bf16 bound (a
comparison limit, measured on deepspeed 0.19.8: update rel error 0.07 at step 1, weights [1, 1]).

Samples: a base case that generates its samples gets explicit samples drawn per sample (prompt 1..max tokens, a
response of 1..max tokens closed by EOS, very unequal lengths across micro-batches and ranks as Hypothesis likes
boundary values), token ids from a seeded stream per sample so shrinking one length never changes another sample.
A base case with explicit samples is fuzzed by reordering (a permutation), regrouping (the drawn batching), and
trimming or extending each response before its closing token.
"""

from __future__ import annotations

import dataclasses
import random
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import SpecError, UsageError
from .registry import get_adapter, knob_class
from .spec import Sample, Spec, from_dict, to_dict


@dataclass(frozen=True)
class Limits:
    """Upper ends of the count dimensions (lower ends are 1)."""

    max_world_size: int = 2
    max_grad_accum: int = 4
    max_micro_batch: int = 3
    max_steps: int = 4
    max_prompt_len: int = 12
    max_response_len: int = 40
    """Response tokens including the closing EOS: from 1 (EOS alone) to long."""
    max_extend: int = 16
    """Explicit-sample bases: most tokens added to one response."""


BATCH_DIMS = ("batch.world_size", "batch.grad_accum", "batch.micro_batch_size", "batch.steps")
DATA_DIMS = ("data.seed", "data.samples")
SPEC_CHOICE_DIMS = ("model.dtype", "optimizer.name", "optimizer.lr", "optimizer.momentum", "optimizer.betas",
                    "optimizer.eps", "optimizer.weight_decay", "optimizer.clip_grad_norm", "loss.aggregation",
                    "data.supervise")
LR = {"sgd": (0.1, 0.01, 0.5), "adamw": (1e-3, 1e-2, 1e-4)}
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class Space:
    """What one campaign draws: the base case, the adapter, and which dimensions vary or are pinned."""

    base: Spec
    adapter: str
    version: str | None
    limits: Limits
    active: tuple[str, ...]
    """Dimensions drawn, in drawing order."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """Dimensions pinned to a value (--fix FIELD=VALUE)."""
    extra_pins: tuple[str, ...] = ()
    """The other pins of the framework's version set (some knobs need a package there)."""

    def is_active(self, dim: str) -> bool:
        return dim in self.active


# --------------------------------------------------------------------------------------------------------------
# Dimensions and domains


def _knob_defaults(adapter: str) -> dict[str, Any]:
    cls = knob_class(adapter)
    return {f.name: f.default for f in dataclasses.fields(cls)} if cls is not None else {}


def world_sizes(adapter: str, limits: Limits) -> list[int]:
    """World sizes the adapter declares (its capabilities text, e.g. '1, 2 (gloo ...)'), capped by the limits."""
    text = get_adapter(adapter).capabilities.world_sizes.split("(")[0]
    if "any" in text or "..." in text:
        return list(range(1, limits.max_world_size + 1))
    found = sorted({int(x) for x in re.findall(r"\d+", text)})
    return [w for w in found if w <= limits.max_world_size] or [1]


def knob_domain(adapter: str, knob: str, base_value: Any, version: str | None = None,
                extra_pins: tuple[str, ...] = ()) -> tuple[Any, ...]:
    """Values a knob is fuzzed over, the base value first. From the adapter's `fuzz_knobs` (a dict, or a classmethod
    of (version, extra_pins) returning one) when it names the knob, else from the knob's type: every Literal choice,
    both booleans, a small integer range, or the base value alone."""
    declared = getattr(get_adapter(adapter), "fuzz_knobs", None) or {}
    if callable(declared):
        declared = declared(version, extra_pins)
    if knob in declared:
        listed = tuple(declared[knob])
        return (base_value, *[v for v in listed if v != base_value]) if listed else (base_value,)
    cls = knob_class(adapter)
    if cls is None:
        raise ValueError(f"adapter {adapter!r} takes no knobs (asked for {knob!r})")
    f = {x.name: x for x in dataclasses.fields(cls)}[knob]
    tp = typing.get_type_hints(cls)[knob]
    values: tuple[Any, ...]
    if typing.get_origin(tp) is Literal:
        values = typing.get_args(tp)
    elif tp is bool:
        values = (False, True)
    elif tp is int:
        lo = int(f.metadata.get("minimum", 0))
        default = f.default if isinstance(f.default, int) else lo
        values = tuple(range(lo, max(default + 2, lo + 4))) if default <= 16 else (default, max(lo, default // 1000))
    else:
        values = (base_value,)
    return (base_value, *[v for v in values if v != base_value])


def all_dimensions(base: Spec, adapter: str) -> list[str]:
    """Every dimension a campaign against `adapter` can draw, in drawing order."""
    dims = [*BATCH_DIMS, *SPEC_CHOICE_DIMS]
    dims += [f"{adapter}.{k}" for k in _knob_defaults(adapter)]
    return [*dims, *DATA_DIMS]


def default_dimensions(base: Spec, adapter: str) -> list[str]:
    """The default strategy: everything, except choices that cannot differ for this base (loss aggregation of an
    SFT case: adapters whose loss has no aggregation knob would compute a token mean whatever the spec says)."""
    dims = all_dimensions(base, adapter)
    if base.loss.kind == "sft":
        dims.remove("loss.aggregation")
    return dims


def base_value(base: Spec, dim: str, adapter: str) -> Any:
    section, _, name = dim.partition(".")
    if section == adapter:
        return dataclasses.asdict(base.knobs_for(adapter))[name]
    if dim == "data.samples":
        return None
    return getattr(getattr(base, section), name)


def parse_fix(items: Sequence[str]) -> dict[str, Any]:
    """--fix FIELD=VALUE (VALUE in TOML syntax, or a bare word) or --fix FIELD (the base case's value)."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        for part in [p for p in item.split(";") if p.strip()]:
            name, eq, text = part.partition("=")
            name = name.strip()
            if not eq:
                out[name] = KEEP
                continue
            try:
                out[name] = tomllib.loads(f"v = {text.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                out[name] = text.strip()
    return out


KEEP = object()
"""--fix FIELD without a value: hold the base case's value."""


def build_space(base: Spec, adapter: str, version: str | None = None, vary: Sequence[str] = (),
                fix: Mapping[str, Any] | None = None, limits: Limits | None = None,
                extra_pins: tuple[str, ...] = ()) -> Space:
    """The space of a campaign. `vary` narrows the drawn dimensions (default: `default_dimensions`); `fix` pins some.
    Unknown names and values the spec refuses are usage errors naming the field."""
    limits = limits or Limits()
    known = all_dimensions(base, adapter)
    fix = dict(fix or {})
    for name in [*vary, *fix]:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
            raise UsageError(f"fuzz dimension {name!r} is not known for {adapter}; {hint}")
    if "data.samples" in fix and fix["data.samples"] is not KEEP:
        raise UsageError("--fix data.samples takes no value (it holds the base case's samples)")
    active = [d for d in (known if vary else default_dimensions(base, adapter)) if not vary or d in vary]
    active = [d for d in active if d not in fix]
    pinned = {k: (base_value(base, k, adapter) if v is KEEP else v) for k, v in fix.items() if k != "data.samples"}
    space = Space(base, adapter, version, limits, tuple(active), pinned, tuple(extra_pins))
    try:
        apply(space, dict(pinned))
    except SpecError as e:
        raise UsageError(f"--fix: {e}") from None
    return space


# --------------------------------------------------------------------------------------------------------------
# Drawing


BASE_WEIGHT = 3
"""A choice keeps the base case's value three times as often as it takes all the others together (each dimension
moves away from the case with probability 1/4): a case file names the configuration of interest, so the search
stays around it while ~15 choice dimensions still give every draw several moves."""


def _choice(data: Any, dim: str, base: Any, others: Sequence[Any]) -> Any:
    """The base value (3/4 of the time) or one of the others; shrinks toward the base value."""
    from hypothesis import strategies as st

    rest = [v for v in others if v != base]
    if not rest:
        return base
    # 'move' shrinks toward 0 (keep the base value); values 1..BASE_WEIGHT keep it too, the top one moves
    if data.draw(st.integers(0, BASE_WEIGHT), label=f"{dim}.move") < BASE_WEIGHT:
        return base
    return data.draw(st.sampled_from(rest), label=dim)


def _count(data: Any, dim: str, lo: int, hi: int) -> int:
    from hypothesis import strategies as st

    return int(data.draw(st.integers(lo, max(lo, hi)), label=dim))


def draw(data: Any, space: Space, preset: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One configuration: the pinned dimensions set, then `preset` (what a property draws itself, which wins), then
    the other active dimensions drawn. Returns {dimension: value}; dimensions not listed keep the base case's value.
    Keys starting with '_' are a property's private draws, ignored by `apply`."""
    base, lim, ad = space.base, space.limits, space.adapter
    caps = get_adapter(ad).capabilities
    cfg: dict[str, Any] = {**space.fixed, **(preset or {})}

    def on(dim: str) -> bool:
        return space.is_active(dim) and dim not in cfg

    def cur(dim: str) -> Any:
        return cfg.get(dim, base_value(base, dim, ad))

    if on("batch.world_size"):
        sizes = world_sizes(ad, lim)
        cfg["batch.world_size"] = sizes[_count(data, "batch.world_size", 0, len(sizes) - 1)]
    if on("batch.grad_accum"):
        cfg["batch.grad_accum"] = _count(data, "batch.grad_accum", 1, lim.max_grad_accum)
    if on("batch.micro_batch_size"):
        cfg["batch.micro_batch_size"] = _count(data, "batch.micro_batch_size", 1, lim.max_micro_batch)
    if on("batch.steps"):
        cfg["batch.steps"] = _count(data, "batch.steps", 1, lim.max_steps)
    if on("model.dtype"):
        cfg["model.dtype"] = _choice(data, "model.dtype", cur("model.dtype"),
                                     [d for d in caps.dtypes if d in ("float32", "bfloat16")])
        if cfg["model.dtype"] == "bfloat16" and "batch.steps" not in space.fixed:
            # one step only: beyond it a mixed-precision framework (fp32 master weights) and the reference (bf16
            # weights) legitimately part ways, and bf16 rounding of tiny updates exceeds the update bound
            cfg["batch.steps"] = 1
    if on("optimizer.name"):
        cfg["optimizer.name"] = _choice(data, "optimizer.name", cur("optimizer.name"), list(caps.optimizers))
    opt = cur("optimizer.name")
    if on("optimizer.lr"):
        # an optimizer other than the case's starts from its own usual lr (SGD's 0.1 would make AdamW chaotic)
        own = cur("optimizer.lr") if opt == base.optimizer.name or not LR.get(opt) else LR[opt][0]
        cfg["optimizer.lr"] = _choice(data, "optimizer.lr", own, LR.get(opt, ()))
    if on("optimizer.momentum") and opt == "sgd":
        cfg["optimizer.momentum"] = _choice(data, "optimizer.momentum", cur("optimizer.momentum"), (0.0, 0.9))
    if opt == "adamw":
        if on("optimizer.betas"):
            cfg["optimizer.betas"] = list(_choice(data, "optimizer.betas", tuple(cur("optimizer.betas")),
                                                  [(0.9, 0.999), (0.0, 0.0), (0.5, 0.9)]))
        if on("optimizer.eps"):
            cfg["optimizer.eps"] = _choice(data, "optimizer.eps", cur("optimizer.eps"), (1e-8, 1e-6))
    if on("optimizer.weight_decay"):
        cfg["optimizer.weight_decay"] = _choice(data, "optimizer.weight_decay", cur("optimizer.weight_decay"),
                                                (0.0, 0.01))
    if on("optimizer.clip_grad_norm"):
        # 1.0 rarely acts on a tiny model; 1e-3 always does (the update is then the clipped one)
        cfg["optimizer.clip_grad_norm"] = _choice(data, "optimizer.clip_grad_norm", cur("optimizer.clip_grad_norm"),
                                                  (0.0, 1.0, 1e-3))
    if on("loss.aggregation"):
        cfg["loss.aggregation"] = _choice(data, "loss.aggregation", cur("loss.aggregation"), AGGREGATIONS)
    if on("data.supervise"):
        cfg["data.supervise"] = _choice(data, "data.supervise", cur("data.supervise"), ("response", "all"))
    for knob in _knob_defaults(ad):
        dim = f"{ad}.{knob}"
        if on(dim):
            cfg[dim] = _choice(data, dim, cur(dim), knob_domain(ad, knob, cur(dim), space.version, space.extra_pins))
    if on("data.seed"):
        cfg["data.seed"] = _count(data, "data.seed", 0, 2**16)
    if on("data.samples"):
        cfg["data.samples"] = draw_samples(data, space, cfg)
    return cfg


def sample_count(space: Space, cfg: Mapping[str, Any]) -> int:
    b = space.base.batch

    def g(name: str) -> int:
        return int(cfg.get(f"batch.{name}", getattr(b, name)))

    return g("micro_batch_size") * g("grad_accum") * g("world_size") * g("steps")


def draw_samples(data: Any, space: Space, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The samples' shape: per-sample lengths (generated bases) or order + edits (explicit bases). Drawn as one
    strategy, so Hypothesis can simplify every sample at once while shrinking (one run instead of one per length)."""
    from hypothesis import strategies as st

    base, lim = space.base, space.limits
    n = sample_count(space, cfg)
    if base.data.samples:
        nb = len(base.data.samples)
        order = data.draw(st.permutations(range(nb)), label="data.samples.order")
        edits = data.draw(st.tuples(*[st.tuples(st.integers(0, len(base.data.samples[order[i % nb]].response) - 1),
                                                st.integers(0, lim.max_extend)) for i in range(n)]),
                          label="data.samples.edits")
        return {"order": list(order), "edits": [list(e) for e in edits]}
    # the longest prompt and response first, then each sample's lengths up to them: shrinking the two maxima to 1
    # makes every sample minimal in one step (a framework run per shrink step is the cost that matters)
    p_max = data.draw(st.integers(1, lim.max_prompt_len), label="data.samples.max_prompt_len")
    r_max = data.draw(st.integers(1, lim.max_response_len), label="data.samples.max_response_len")
    width = 3 if base.loss.kind == "dpo" else 2  # prompt, response (, rejected) lengths
    one = st.tuples(st.integers(1, p_max), *[st.integers(1, r_max)] * (width - 1))
    lengths = data.draw(st.tuples(*[one] * n), label="data.samples.lengths")
    return {"lengths": [list(x) for x in lengths]}


# --------------------------------------------------------------------------------------------------------------
# Applying a configuration


def make_samples(spec: Spec, shape: Mapping[str, Any], seed: int, base_samples: Sequence[Sample]) -> list[Sample]:
    """Explicit samples from a drawn shape. Token ids come from a stream seeded by (seed, sample index)."""
    d = spec.data
    low, high = 3, spec.model.vocab_size  # 0, 1, 2 are pad, eos, bos
    out: list[Sample] = []
    if "order" in shape:
        order, edits = shape["order"], shape["edits"]
        for i, (trim, extend) in enumerate(edits):
            s = base_samples[order[i % len(order)]]
            rng = random.Random(f"{seed}:{i}:extend")
            body, last = list(s.response[:-1]), s.response[-1]
            body = body[: len(body) - trim] + [rng.randrange(low, high) for _ in range(extend)]
            out.append(dataclasses.replace(s, response=(*body, last)))
        return out
    group = spec.rl.group_size if spec.loss.kind == "policy" else 1
    prompt: tuple[int, ...] = ()
    for i, lens in enumerate(shape["lengths"]):
        rng = random.Random(f"{seed}:{i}")
        p, r = lens[0], lens[1]
        if i % group == 0:  # GRPO groups share their prompt
            prompt = tuple(rng.randrange(low, high) for _ in range(p))
        truncated = spec.rl.mask_truncated and rng.random() < 0.25
        body = [rng.randrange(low, high) for _ in range(r if truncated or not d.append_eos else r - 1)]
        response = tuple(body) if truncated or not d.append_eos else (*body, d.eos_id)
        rejected: tuple[int, ...] = ()
        if len(lens) > 2:
            rejected = (*[rng.randrange(low, high) for _ in range(lens[2] - 1)], d.eos_id)
        if spec.loss.kind == "sft":  # RL fields stay at their defaults: the saved case shows only what matters
            out.append(Sample(prompt=prompt, response=response))
            continue
        out.append(Sample(prompt=prompt, response=response, rejected=rejected,
                          advantage=round(rng.gauss(0.0, 1.0), 4), reward=float(rng.randint(0, 3)),
                          truncated=truncated, value_target=round(rng.gauss(0.0, 1.0), 4)))
    return out


def apply(space: Space, cfg: Mapping[str, Any]) -> Spec:
    """The base case with the configuration laid over it (validated; SpecError when the combination is invalid)."""
    base, ad = space.base, space.adapter
    raw = to_dict(base)
    for dim, value in cfg.items():
        if dim == "data.samples" or dim.startswith("_"):
            continue
        section, _, name = dim.partition(".")
        if section == ad:
            raw.setdefault("knobs", {}).setdefault(ad, to_dict(base.knobs_for(ad)) or {})[name] = to_dict(value)
        else:
            raw[section][name] = to_dict(value)
    if "data.samples" in cfg:
        partial = from_dict({**raw, "data": {**raw["data"], "samples": []}})
        smp = make_samples(partial, cfg["data.samples"], int(raw["data"]["seed"]), base.data.samples)
        raw["data"]["samples"] = [to_dict(s) for s in smp]
        longest = max(len(s.prompt) + max(len(s.response), len(s.rejected)) for s in smp)
        raw["model"]["max_position_embeddings"] = max(raw["model"]["max_position_embeddings"], longest)
    return from_dict(raw)


def changed(space: Space, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration's dimensions whose value differs from the base case (samples always shown)."""
    out = {}
    for dim, value in cfg.items():
        if dim.startswith("_"):
            continue
        if dim == "data.samples" or to_dict(value) != to_dict(base_value(space.base, dim, space.adapter)):
            out[dim] = value
    return out


def spec_changes(space: Space, spec: Spec) -> dict[str, Any]:
    """Every dimension (samples aside) whose value in `spec` differs from the base case's."""
    out = {}
    for dim in all_dimensions(space.base, space.adapter):
        if dim in ("data.samples",):
            continue
        now, was = base_value(spec, dim, space.adapter), base_value(space.base, dim, space.adapter)
        if now != was:
            out[dim] = to_dict(now)
    return out


def samples_change(base: Spec, spec: Spec) -> str | None:
    """How the spec's explicit samples differ from the base case's, e.g. '2 of the base case's 4 (0, 1 unchanged)';
    None when they are the same (spec_changes leaves samples out: a trimmed case must still say it was trimmed)."""
    was, now = tuple(base.data.samples), tuple(spec.data.samples)
    if was == now:
        return None
    if not was:
        return f"{len(now)} drawn samples (the base case draws its own)"
    kept = [was.index(x) for x in now if x in was]
    edited = len(now) - len(kept)
    parts = ([f"{', '.join(map(str, kept))} unchanged"] if kept else []) + ([f"{edited} edited"] if edited else [])
    return f"{len(now)} of the base case's {len(was)} ({'; '.join(parts)})"


def describe_samples(spec: Spec) -> str:
    """Per micro-batch supervised-token counts of step 0, e.g. 'rank 0: [2, 30]' - the shape the mean-of-means bugs
    need."""
    from . import data as D

    counts = D.microbatch_token_counts(spec, 0)
    return "; ".join(f"rank {r}: {c}" for r, c in enumerate(counts)) if len(counts) > 1 else str(counts[0])
