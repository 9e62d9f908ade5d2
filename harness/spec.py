"""The step spec: a typed, frozen dataclass tree loaded from TOML and validated on load.

Every field has a default and a one-line doc (`field(metadata={"doc": ...})`, printed by `stepdiff spec-help`).
Validation errors name the field, the bad value and the fix, on one line (`SpecError`).

Per-framework knobs live in tables named after the adapter (`[deepspeed]`, `[openrlhf]`, ...). The harness does not
know their fields: it asks the adapter registry for the knob dataclass by name and validates the table against it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from .errors import SpecError

Dtype = Literal["float32", "bfloat16", "float64"]


def doc(default: Any, text: str, **kw: Any) -> Any:
    """A dataclass field with a default and a one-line doc string."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use an immutable default (tuple)")
    return field(default=default, metadata={"doc": text, **kw})


@dataclass(frozen=True)
class CaseSpec:
    name: str = doc("unnamed", "Short name of the case, used in reports and file names.")
    description: str = doc("", "What the case checks and why, one paragraph.")
    frameworks: tuple[str, ...] = doc((), "Framework runs as NAME==VERSION pins, e.g. 'deepspeed==0.18.9'.")


@dataclass(frozen=True)
class ModelSpec:
    preset: Literal["tiny", "llama-160m", "llama-0.5b", "llama-1b", "llama-8b"] = doc(
        "tiny", "Named shape; 'tiny' uses the fields below, the others are real-size shapes for the GPU path.")
    vocab_size: int = doc(64, "Vocabulary size (ids 0=pad, 1=eos, 2=bos are reserved).", minimum=8)
    hidden_size: int = doc(32, "Hidden size of the Llama-like model.", minimum=1)
    intermediate_size: int = doc(64, "MLP intermediate size.", minimum=1)
    num_layers: int = doc(2, "Number of decoder layers.", minimum=1)
    num_heads: int = doc(4, "Attention heads (must divide hidden_size).", minimum=1)
    num_kv_heads: int = doc(2, "Key/value heads (must divide num_heads).", minimum=1)
    max_position_embeddings: int = doc(256, "Maximum sequence length the model accepts.", minimum=2)
    tie_word_embeddings: bool = doc(False, "Share the input embedding and the LM head.")
    rms_norm_eps: float = doc(1e-6, "RMSNorm epsilon.", minimum=0.0)
    rope_theta: float = doc(10000.0, "Rotary embedding base.", minimum=1.0)
    dtype: Dtype = doc("float32", "Parameter and compute dtype of every run.")
    attn_implementation: Literal["eager", "sdpa"] = doc("eager", "Attention kernel, fixed for every run.")
    seed: int = doc(0, "Seed of the initial weights (written once to a safetensors file every worker loads).")
    init_std: float = doc(0.02, "Std of the normal init of linear and embedding weights.", minimum=0.0)


@dataclass(frozen=True)
class Sample:
    prompt: tuple[int, ...] = doc((), "Prompt token ids (not supervised unless data.supervise = 'all').")
    response: tuple[int, ...] = doc((), "Response token ids (supervised); include the EOS id yourself.")
    rejected: tuple[int, ...] = doc((), "DPO: the rejected response (then `response` is the chosen one).")
    advantage: float = doc(0.0, "RL: the sample's advantage, broadcast over its response tokens.")
    reward: float = doc(0.0, "RL: the sample's scalar reward.")
    truncated: bool = doc(False, "RL: the completion hit the length limit (no EOS).")
    value_target: float = doc(0.0, "Value loss: the return every response token's value is regressed to.")


@dataclass(frozen=True)
class DataSpec:
    samples: tuple[Sample, ...] = doc((), "Explicit samples; when empty they are generated from the fields below.")
    seed: int = doc(1234, "Seed of the sample generator.")
    prompt_len: tuple[int, int] = doc((2, 8), "Inclusive [min, max] generated prompt length.")
    response_len: tuple[int, int] = doc((1, 16), "Inclusive [min, max] generated response length (EOS included).")
    append_eos: bool = doc(True, "End every generated response with the EOS id.")
    supervise: Literal["response", "all"] = doc(
        "response", "Which next-token targets count in the loss: response tokens only, or every token after the first.")
    pad_id: int = doc(0, "Padding id (never supervised).", minimum=0)
    pad_to: int = doc(0, "Pad every micro-batch to at least this many tokens (pads are neither attended nor "
                         "supervised; the padding property); 0 = to its longest sample.", minimum=0)
    eos_id: int = doc(1, "End-of-sequence id.", minimum=0)
    bos_id: int = doc(2, "Beginning-of-sequence id.", minimum=0)


@dataclass(frozen=True)
class BatchSpec:
    micro_batch_size: int = doc(1, "Samples per micro-batch per rank.", minimum=1)
    grad_accum: int = doc(1, "Micro-batches accumulated per optimizer step, per rank.", minimum=1)
    world_size: int = doc(1, "Data-parallel ranks (gloo on CPU, nccl on CUDA).", minimum=1)
    steps: int = doc(1, "Optimizer steps.", minimum=1)


@dataclass(frozen=True)
class OptimizerSpec:
    name: Literal["sgd", "adamw"] = doc("sgd", "Optimizer; torch's SGD or AdamW semantics.")
    lr: float = doc(0.1, "Learning rate (constant schedule, no warmup).", minimum=0.0)
    momentum: float = doc(0.0, "SGD momentum.", minimum=0.0)
    betas: tuple[float, float] = doc((0.9, 0.999), "AdamW betas.")
    eps: float = doc(1e-8, "AdamW epsilon.", minimum=0.0)
    weight_decay: float = doc(0.0, "Decoupled weight decay (AdamW) or L2 (SGD).", minimum=0.0)
    clip_grad_norm: float = doc(0.0, "Global grad-norm clipping; 0 = off (and set explicitly off in every framework).",
                                minimum=0.0)
    schedule: Literal["constant"] = doc("constant", "Learning-rate schedule.")


@dataclass(frozen=True)
class LossSpec:
    kind: Literal["sft", "dpo", "policy", "value"] = doc(
        "sft", "Objective: next-token SFT, DPO, PPO/GRPO policy loss or value loss.")
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = doc(
        "token-mean", "How the reference aggregates token losses over the whole optimizer step (all micro-batches and "
        "ranks); token-mean is correct for SFT; seq-mean-token-sum-norm divides token sums by rl.max_response_len.")


@dataclass(frozen=True)
class RLSpec:
    """Fields shared by every RL adapter (TRL GRPO/DPO, verl actor/critic, OpenRLHF PPO): one RL spec, not several.

    Rollouts are injected, never generated: the responses are data.samples[i].response, old log-probs equal the
    current ones (ratio 1, so clipping cannot act), the reference policy equals the initial weights, and the KL and
    entropy coefficients are 0 unless set.
    """

    group_size: int = doc(1, "GRPO: completions per prompt (consecutive samples share a group).", minimum=1)
    advantage: Literal["given", "group-normalized", "group-centered"] = doc(
        "given", "Where advantages come from: Sample.advantage, or rewards normalised within each group "
        "((r - mean) / (std + advantage_eps)) or only centred (r - mean).")
    advantage_eps: float = doc(1e-4, "Epsilon of the group std normalisation.", minimum=0.0)
    mask_truncated: bool = doc(False, "Truncated completions (Sample.truncated) get no loss and no share of the "
                                      "normaliser.")
    clip_ratio_low: float = doc(0.2, "PPO ratio clip below 1 (no effect at ratio 1, recorded for the frameworks).",
                                minimum=0.0)
    clip_ratio_high: float = doc(0.2, "PPO ratio clip above 1.", minimum=0.0)
    value_clip: float = doc(0.5, "Value-loss clip range (no effect when old values equal current ones).", minimum=0.0)
    max_response_len: int = doc(0, "Response-length normaliser of seq-mean-token-sum-norm / dr_grpo; 0 = the "
                                   "longest response in the step.", minimum=0)
    dpo_beta: float = doc(0.1, "DPO temperature beta.", minimum=0.0)


@dataclass(frozen=True)
class RunSpec:
    device: Literal["cpu", "cuda"] = doc("cpu", "Device of every run (gloo on CPU, nccl on CUDA).")
    timeout_s: float = doc(600.0, "Wall-clock limit of one framework run; past it the run is an error.", minimum=1.0)
    rel_tolerance: float = doc(0.0, "Override of the relative-error bound; 0 = calibrated from dtype and the "
                                    "reference's own fp64 error.", minimum=0.0)


@dataclass(frozen=True)
class Spec:
    case: CaseSpec = doc(CaseSpec(), "Name, description and the framework pins to run.")
    model: ModelSpec = doc(ModelSpec(), "The tiny causal LM.")
    data: DataSpec = doc(DataSpec(), "Samples and which tokens are supervised.")
    batch: BatchSpec = doc(BatchSpec(), "Micro-batch size, accumulation, world size, steps.")
    optimizer: OptimizerSpec = doc(OptimizerSpec(), "Optimizer, lr and clipping.")
    loss: LossSpec = doc(LossSpec(), "Objective and the reference's loss aggregation.")
    rl: RLSpec = doc(RLSpec(), "RL fields: groups, advantages, truncation, clipping, DPO beta.")
    run: RunSpec = doc(RunSpec(), "Device, timeout and tolerance override.")
    knobs: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}),
                                     metadata={"doc": "Per-framework knob tables, keyed by adapter name."})

    def knobs_for(self, adapter: str) -> Any:
        """The validated knob dataclass of `adapter` (its defaults when the case has no table for it)."""
        if adapter in self.knobs:
            return self.knobs[adapter]
        from .registry import knob_class

        cls = knob_class(adapter)
        return cls() if cls is not None else None

    @property
    def samples_per_step(self) -> int:
        return self.batch.micro_batch_size * self.batch.grad_accum * self.batch.world_size

    def replace(self, **sections: Any) -> Spec:
        """A copy with whole sections replaced, or `section__field=value` for single fields (re-validated)."""
        raw = to_dict(self)
        for key, value in sections.items():
            if "__" in key:
                sec, name = key.split("__", 1)
                raw.setdefault(sec, {})[name] = to_dict(value)
            else:
                raw[key] = to_dict(value)
        return from_dict(raw)


SECTIONS = {f.name: f for f in dataclasses.fields(Spec)}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(sorted(options))}"


def _convert(path: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """Convert a TOML value to the annotated type, raising SpecError that names `path`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise SpecError(path, value, "not one of the choices", f"use one of {', '.join(map(repr, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise SpecError(path, value, "expected a table", f"write [{path}] with key = value lines")
        return _build(tp, value, path)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise SpecError(path, value, "expected a list", f"write {path} = [...]")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{path}[{i}]", v, args[0], {}) for i, v in enumerate(value))
        if len(value) != len(args):
            dots = ", ".join("..." for _ in args)
            raise SpecError(path, value, f"expected {len(args)} values", f"write {path} = [{dots}]")
        return tuple(_convert(f"{path}[{i}]", v, a, {}) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(path, value, "expected true or false", f"write {path} = true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(path, value, "expected an integer", f"write {path} = <integer>")
        out: Any = value
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(path, value, "expected a number", f"write {path} = <number>")
        out = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise SpecError(path, value, "expected a string", f'write {path} = "..."')
        return value
    else:  # pragma: no cover - a spec author error, not a user error
        raise TypeError(f"unsupported spec type {tp!r} at {path}")
    if "minimum" in meta and out < meta["minimum"]:
        raise SpecError(path, value, f"must be >= {meta['minimum']}", f"set {path} to {meta['minimum']} or more")
    return out


def _build(cls: Any, table: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise SpecError(path, value, "unknown field", _suggest(key, list(fields)))
        kwargs[key] = _convert(path, value, hints[key], fields[key].metadata)
    return cls(**kwargs)


def from_dict(raw: Mapping[str, Any]) -> Spec:
    """Build and validate a Spec from a plain dict (a parsed TOML file)."""
    from .registry import adapter_names, knob_class

    sections: dict[str, Any] = {}
    knobs: dict[str, Any] = dict(raw.get("knobs", {}))
    for key, value in raw.items():
        if key == "knobs":
            continue
        if key in SECTIONS:
            sections[key] = value
        elif key in adapter_names():
            knobs[key] = value
        else:
            raise SpecError(key, "[table]", "unknown section", _suggest(key, [*SECTIONS, *adapter_names()]))
    hints = typing.get_type_hints(Spec)
    built: dict[str, Any] = {}
    for name, value in sections.items():
        built[name] = _convert(name, value, hints[name], SECTIONS[name].metadata)
    validated_knobs = {}
    for name, table in knobs.items():
        cls = knob_class(name)
        if cls is None:
            raise SpecError(name, "[table]", "this adapter takes no knobs", f"remove the [{name}] table")
        validated_knobs[name] = table if dataclasses.is_dataclass(table) else _build(cls, table, name)
    spec = Spec(**built, knobs=types.MappingProxyType(validated_knobs))
    validate(spec)
    return spec


def load(path: str | Path) -> Spec:
    """Load a case file. A missing or malformed file is a SpecError naming the file."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise SpecError("case", str(p), "file not found",
                        "give a path to a .toml case file or a bundled case name") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError("case", str(p), f"not valid TOML ({e})", "fix the TOML syntax at that line") from None
    return from_dict(raw)


def validate(spec: Spec) -> None:
    """Cross-field checks that single-field types cannot express."""
    m, d, b = spec.model, spec.data, spec.batch
    if m.hidden_size % m.num_heads:
        raise SpecError("model.num_heads", m.num_heads, f"does not divide hidden_size {m.hidden_size}",
                        "pick a divisor of model.hidden_size")
    if m.num_heads % m.num_kv_heads:
        raise SpecError("model.num_kv_heads", m.num_kv_heads, f"does not divide num_heads {m.num_heads}",
                        "pick a divisor of model.num_heads")
    if (m.hidden_size // m.num_heads) % 2:
        raise SpecError("model.hidden_size", m.hidden_size, "head dim must be even for rotary embeddings",
                        "make hidden_size / num_heads even")
    for name, (lo, hi) in (("data.prompt_len", d.prompt_len), ("data.response_len", d.response_len)):
        if lo < 1 or hi < lo:
            raise SpecError(name, [lo, hi], "needs 1 <= min <= max", f"write {name} = [1, 8] or similar")
    longest = d.prompt_len[1] + d.response_len[1]
    for i, s in enumerate(d.samples):
        if not s.response:
            raise SpecError(f"data.samples[{i}].response", [], "empty response", "give at least one response token")
        ids = (*s.prompt, *s.response, *s.rejected)
        bad = [t for t in ids if not 0 <= t < m.vocab_size]
        if bad:
            raise SpecError(f"data.samples[{i}]", bad[0], f"token id outside [0, {m.vocab_size})",
                            "use ids below model.vocab_size")
        longest = max(longest, len(s.prompt) + max(len(s.response), len(s.rejected)))
    longest = max(longest, d.pad_to)
    if longest > m.max_position_embeddings:
        raise SpecError("model.max_position_embeddings", m.max_position_embeddings,
                        f"shorter than the longest sample ({longest})", f"set it to {longest} or more")
    if d.samples and len(d.samples) < spec.samples_per_step * b.steps:
        need = spec.samples_per_step * b.steps
        raise SpecError("data.samples", f"{len(d.samples)} samples",
                        f"the batching needs {need} "
                        "(micro_batch_size x grad_accum x world_size x steps)",
                        f"give {need} samples or reduce batching")
    if spec.optimizer.name == "adamw" and not all(0 <= x < 1 for x in spec.optimizer.betas):
        raise SpecError("optimizer.betas", list(spec.optimizer.betas), "each beta must be in [0, 1)",
                        "write optimizer.betas = [0.9, 0.999]")
    grouped = spec.loss.kind == "policy" and spec.rl.advantage != "given"
    if grouped and spec.samples_per_step % spec.rl.group_size:
        raise SpecError("rl.group_size", spec.rl.group_size,
                        f"does not divide the {spec.samples_per_step} samples of a step",
                        "make micro_batch_size x grad_accum x world_size a multiple of rl.group_size")
    if spec.loss.kind == "dpo" and d.samples and any(not s.rejected for s in d.samples):
        raise SpecError("data.samples", "rejected = []", "DPO needs a rejected response in every sample",
                        "give each sample a `rejected` list")
    for reserved in (d.pad_id, d.eos_id, d.bos_id):
        if reserved >= m.vocab_size:
            raise SpecError("data", reserved, "special id outside the vocabulary", "use ids below model.vocab_size")


def to_dict(obj: Any) -> Any:
    """A plain, JSON/TOML-friendly dict of a spec (round-trips through from_dict)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            out[f.name] = to_dict(getattr(obj, f.name))
        if isinstance(obj, Spec):
            out["knobs"] = {k: to_dict(v) for k, v in obj.knobs.items()}
        return out
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def field_docs(cls: Any = Spec, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every field: what `stepdiff spec-help` prints."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and f.name != "samples":
            rows.extend(field_docs(tp, name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else ""
            rows.append((name, repr(to_dict(default)), f.metadata.get("doc", "")))
    return rows
