"""The step spec: a typed, frozen dataclass tree loaded from TOML and validated on load.

Every field has a default and a one-line doc (`field(metadata={"doc": ...})`, printed by `stepdiff spec-help`).
Validation errors name the field, the bad value (truncated) and the fix, on one line (`SpecError`).

The loader refuses what it cannot honour, before anything is allocated or generated: non-finite numbers, sizes past
the documented ceilings (each field's `maximum`, plus MAX_PARAMETERS / MAX_SAMPLES / MAX_GENERATED_TOKENS), a
tolerance override above the dtype's ceiling, a table where a value belongs and the reverse, files that are not
regular UTF-8 text of at most MAX_CASE_BYTES, nesting deeper than MAX_DEPTH, names that would escape their folder,
pins that are not NAME==VERSION, a step with no supervised token, and the same knob table given twice.

Per-framework knobs live in tables named after the adapter (`[deepspeed]`, `[openrlhf]`, ...). The harness does not
know their fields: it asks the adapter registry for the knob dataclass by name and validates the table against it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import stat
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import SpecError

MAX_CASE_BYTES = 8 * 2**20
"""Largest case file read (a case is a few KiB; this refuses /dev/zero-like inputs before reading them)."""
MAX_DEPTH = 6
"""Deepest nesting of tables and lists a case file may have (the deepest real field, a sample's token list, is 5)."""
MAX_PARAMETERS = {"cpu": 10**9, "cuda": 2 * 10**10}
"""Largest model (parameters) per device: several fp32 copies live in the harness and every worker."""
MAX_SAMPLES = 100_000
"""Most samples one case may use (micro_batch_size x grad_accum x world_size x steps)."""
MAX_GENERATED_TOKENS = 10**7
"""Most tokens the seeded generator may produce (samples x longest prompt + response)."""
MAX_SEED = 2**63 - 1
MAX_STRING = 10_000
"""Longest string field (a description is a paragraph)."""

Dtype = Literal["float32", "bfloat16", "float16", "float64"]


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
    vocab_size: int = doc(64, "Vocabulary size (ids 0=pad, 1=eos, 2=bos are reserved).", minimum=8, maximum=2**18)
    hidden_size: int = doc(32, "Hidden size of the Llama-like model.", minimum=1, maximum=2**14)
    intermediate_size: int = doc(64, "MLP intermediate size.", minimum=1, maximum=2**16)
    num_layers: int = doc(2, "Number of decoder layers.", minimum=1, maximum=256)
    num_heads: int = doc(4, "Attention heads (must divide hidden_size).", minimum=1, maximum=256)
    num_kv_heads: int = doc(2, "Key/value heads (must divide num_heads).", minimum=1, maximum=256)
    max_position_embeddings: int = doc(256, "Maximum sequence length the model accepts.", minimum=2, maximum=2**17)
    tie_word_embeddings: bool = doc(False, "Share the input embedding and the LM head.")
    rms_norm_eps: float = doc(1e-6, "RMSNorm epsilon.", minimum=0.0, maximum=1.0)
    rope_theta: float = doc(10000.0, "Rotary embedding base.", minimum=1.0, maximum=1e9)
    dtype: Dtype = doc("float32", "Parameter and compute dtype of every run.")
    attn_implementation: Literal["eager", "sdpa"] = doc("eager", "Attention kernel, fixed for every run.")
    seed: int = doc(0, "Seed of the initial weights (written once to a safetensors file every worker loads).",
                    minimum=0, maximum=MAX_SEED)
    init_std: float = doc(0.02, "Std of the normal init of linear and embedding weights.", minimum=0.0, maximum=10.0)


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
    seed: int = doc(1234, "Seed of the sample generator.", minimum=0, maximum=MAX_SEED)
    prompt_len: tuple[int, int] = doc((2, 8), "Inclusive [min, max] generated prompt length.")
    response_len: tuple[int, int] = doc((1, 16), "Inclusive [min, max] generated response length (EOS included).")
    append_eos: bool = doc(True, "End every generated response with the EOS id.")
    supervise: Literal["response", "all"] = doc(
        "response", "Which next-token targets count in the loss: response tokens only, or every token after the first.")
    pad_id: int = doc(0, "Padding id (never supervised).", minimum=0, maximum=2**18)
    pad_to: int = doc(0, "Pad every micro-batch to at least this many tokens (pads are neither attended nor "
                         "supervised; the padding property); 0 = to its longest sample.", minimum=0, maximum=2**17)
    eos_id: int = doc(1, "End-of-sequence id.", minimum=0, maximum=2**18)
    bos_id: int = doc(2, "Beginning-of-sequence id.", minimum=0, maximum=2**18)


@dataclass(frozen=True)
class BatchSpec:
    micro_batch_size: int = doc(1, "Samples per micro-batch per rank.", minimum=1, maximum=4096)
    grad_accum: int = doc(1, "Micro-batches accumulated per optimizer step, per rank.", minimum=1, maximum=4096)
    world_size: int = doc(1, "Data-parallel ranks (gloo on CPU, nccl on CUDA).", minimum=1, maximum=1024)
    steps: int = doc(1, "Optimizer steps.", minimum=1, maximum=10_000)


@dataclass(frozen=True)
class OptimizerSpec:
    name: Literal["sgd", "adamw"] = doc("sgd", "Optimizer; torch's SGD or AdamW semantics.")
    lr: float = doc(0.1, "Learning rate (constant schedule, no warmup).", minimum=0.0)
    momentum: float = doc(0.0, "SGD momentum.", minimum=0.0)
    betas: tuple[float, float] = doc((0.9, 0.999), "AdamW betas.")
    eps: float = doc(1e-8, "AdamW epsilon.", minimum=0.0)
    weight_decay: float = doc(0.0, "Decoupled weight decay (AdamW) or L2 (SGD).", minimum=0.0)
    no_decay: tuple[str, ...] = doc((), "Parameter-name regular expressions (searched in the canonical name) that "
                                        "get no weight decay, e.g. ['norm', 'bias'] as transformers' Trainer and "
                                        "OpenRLHF group parameters; empty = every parameter decays.")
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

    group_size: int = doc(1, "GRPO: completions per prompt (consecutive samples share a group).", minimum=1,
                          maximum=4096)
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
                                   "longest response in the step.", minimum=0, maximum=2**17)
    dpo_beta: float = doc(0.1, "DPO temperature beta.", minimum=0.0)


@dataclass(frozen=True)
class RunSpec:
    device: Literal["cpu", "cuda"] = doc("cpu", "Device of every run (gloo on CPU, nccl on CUDA).")
    timeout_s: float = doc(600.0, "Wall-clock limit of one framework run; past it the run is an error.", minimum=1.0,
                           maximum=7 * 86400.0)
    reference_timeout_s: float = doc(600.0, "Wall-clock limit of the reference run (and its float64 calibration), "
                                            "separate from the frameworks' timeout.", minimum=1.0,
                                     maximum=7 * 86400.0)
    rel_tolerance: float = doc(0.0, "Override of the relative-error bound; 0 = calibrated from dtype and the "
                                    "reference's own fp64 error; at most the dtype's ceiling (1e-6 float64, 1e-2 "
                                    "float32, 0.2 bfloat16).", minimum=0.0)
    update_tolerance: float = doc(0.0, "Override of the bound on update and optimizer-state errors; 0 = calibrated "
                                       "from the reference's own update error against float64.", minimum=0.0,
                                  maximum=1.0)


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
        knobs = raw.setdefault("knobs", {})  # an adapter's knob table is replaced where the spec keeps it
        for key, value in sections.items():
            if "__" in key:
                sec, name = key.split("__", 1)
                (knobs if sec in knobs else raw).setdefault(sec, {})[name] = to_dict(value)
            else:
                (knobs if key in knobs else raw)[key] = to_dict(value)
        return from_dict(raw)


SECTIONS = {f.name: f for f in dataclasses.fields(Spec)}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(sorted(options))}"


def _convert(path: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """Convert a TOML value to the annotated type, raising SpecError that names `path`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise SpecError(path, value, "expected a table, got a single value",
                            f"write [{path}] with key = value lines")
        return _build(tp, value, path)
    if isinstance(value, Mapping):
        raise SpecError(path, value, "a table where a value is expected", f"write {path} = <value>, not a table")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, list) or value not in choices:
            raise SpecError(path, value, "not one of the choices", f"use one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise SpecError(path, value, "expected a list", f"write {path} = [...]")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{path}[{i}]", v, args[0], meta) for i, v in enumerate(value))
        if len(value) != len(args):
            dots = ", ".join("..." for _ in args)
            raise SpecError(path, value, f"expected {len(args)} values", f"write {path} = [{dots}]")
        return tuple(_convert(f"{path}[{i}]", v, a, meta) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if isinstance(value, list):
        raise SpecError(path, value, "a list where a single value is expected", f"write {path} = <value>")
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
        try:
            out = float(value)
        except OverflowError:
            out = math.inf
        if not math.isfinite(out):
            raise SpecError(path, value, "not a finite number", f"write {path} = <finite number>")
    elif tp is str:
        if not isinstance(value, str):
            raise SpecError(path, value, "expected a string", f'write {path} = "..."')
        if len(value) > MAX_STRING:
            raise SpecError(path, value, f"longer than {MAX_STRING} characters", "shorten it")
        return value
    else:  # pragma: no cover - a spec author error, not a user error
        raise TypeError(f"unsupported spec type {tp!r} at {path}")
    if "minimum" in meta and out < meta["minimum"]:
        raise SpecError(path, value, f"must be >= {meta['minimum']}", f"set {path} to {meta['minimum']} or more")
    if "maximum" in meta and out > meta["maximum"]:
        raise SpecError(path, value, f"above the ceiling {meta['maximum']}", f"set {path} to {meta['maximum']} or less")
    return out


def _build(cls: Any, table: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(table, Mapping):
        raise SpecError(prefix, table, "expected a table, got a single value",
                        f"write [{prefix}] with key = value lines")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise SpecError(path, value, "unknown field", _suggest(str(key), list(fields)))
        kwargs[key] = _convert(path, value, hints[key], fields[key].metadata)
    return cls(**kwargs)


def _check_depth(raw: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse nesting deeper than `limit` (iteratively: a pathological file must not exhaust the stack)."""
    todo: list[tuple[Any, str, int]] = [(raw, "", 0)]
    while todo:
        obj, path, depth = todo.pop()
        children: list[tuple[str, Any]]
        if isinstance(obj, Mapping):
            children = [(f"{path}.{k}" if path else str(k), v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        else:
            continue
        if depth >= limit and children:
            raise SpecError(path or "case", "[...]", f"nested deeper than {limit} levels",
                            "flatten it: no field of a case file nests that deep")
        todo.extend((v, p, depth + 1) for p, v in children)


def from_dict(raw: Mapping[str, Any]) -> Spec:
    """Build and validate a Spec from a plain dict (a parsed TOML file)."""
    from .registry import adapter_names, knob_class

    if not isinstance(raw, Mapping):
        raise SpecError("case", raw, "expected a table of sections", "write [case], [model], ... sections")
    _check_depth(raw)
    sections: dict[str, Any] = {}
    knobs_in = raw.get("knobs", {})
    if not isinstance(knobs_in, Mapping):
        raise SpecError("knobs", knobs_in, "expected a table of knob tables", "write [knobs.ADAPTER] or [ADAPTER]")
    knobs: dict[str, Any] = {}
    for name, table in knobs_in.items():
        if name not in adapter_names():
            raise SpecError(f"knobs.{name}", "[table]", "unknown adapter", _suggest(str(name), adapter_names()))
        knobs[name] = table
    for key, value in raw.items():
        if key == "knobs":
            continue
        if key in SECTIONS:
            sections[key] = value
        elif key in adapter_names():
            if key in knobs:
                raise SpecError(key, "[table]", f"knobs given twice, as [{key}] and as [knobs.{key}]",
                                "keep one of the two tables")
            knobs[key] = value
        else:
            raise SpecError(key, "[table]", "unknown section", _suggest(str(key), [*SECTIONS, *adapter_names()]))
    hints = typing.get_type_hints(Spec)
    built: dict[str, Any] = {}
    for name, value in sections.items():
        built[name] = _convert(name, value, hints[name], SECTIONS[name].metadata)
    validated_knobs = {}
    for name, table in knobs.items():
        cls = knob_class(name)
        if cls is None:
            raise SpecError(name, "[table]", "this adapter takes no knobs", f"remove the [{name}] table")
        if dataclasses.is_dataclass(table) and not isinstance(table, type):
            if not isinstance(table, cls):
                raise SpecError(name, table, f"not a {cls.__name__}", f"give [{name}] as a table")
            validated_knobs[name] = table
        else:
            validated_knobs[name] = _build(cls, table, name)
    spec = Spec(**built, knobs=types.MappingProxyType(validated_knobs))
    validate(spec)
    return spec


def read_case_text(p: Path) -> str:
    """The text of a case file: a regular file of at most MAX_CASE_BYTES, UTF-8 (SpecError otherwise)."""
    fix = "give a path to a .toml case file or a bundled case name"
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise SpecError("case", str(p), "file not found", fix) from None
    except OSError as e:
        raise SpecError("case", str(p), f"cannot be read ({e.strerror or e})", fix) from None
    if stat.S_ISDIR(st.st_mode):
        raise SpecError("case", str(p), "is a directory, not a case file", fix)
    if not stat.S_ISREG(st.st_mode):
        raise SpecError("case", str(p), "is not a regular file (a device, pipe or socket)", fix)
    if st.st_size > MAX_CASE_BYTES:
        raise SpecError("case", str(p), f"is {st.st_size} bytes, above the {MAX_CASE_BYTES} byte ceiling of a case "
                        "file", "give a case file (a few KiB of TOML)")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CASE_BYTES + 1)
    except OSError as e:
        raise SpecError("case", str(p), f"cannot be read ({e.strerror or e})", fix) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError("case", str(p), f"is not UTF-8 text (byte {e.start})", "save the case file as UTF-8 TOML"
                        ) from None


def load(path: str | Path) -> Spec:
    """Load a case file. Anything wrong with it (missing, not a regular UTF-8 file, bad TOML, pathological nesting,
    a bad field or pin) is a one-line SpecError naming the field."""
    from . import pins
    from .registry import adapter_names

    p = Path(path)
    text = read_case_text(p)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError("case", str(p), f"not valid TOML ({e})", "fix the TOML syntax at that line") from None
    except RecursionError:
        raise SpecError("case", str(p), f"nested deeper than {MAX_DEPTH} levels",
                        "flatten it: no field of a case file nests that deep") from None
    spec = from_dict(raw)
    # pins reach the installer: check them here (on the host), where the case file is read
    for i, pin in enumerate(spec.case.frameworks):
        try:
            pins.parse(pin, adapter_names(), f"case.frameworks[{i}]")
        except pins.PinError as e:
            raise SpecError(f"case.frameworks[{i}]", pin, e.problem, e.fix) from None
    return spec


def check_name(field: str, name: str) -> None:
    """A name that becomes a file or folder name: no separators, no '..', no control characters, not too long."""
    bad = ("/" in name or "\\" in name or name.startswith(".") or not name.strip()
           or any(not c.isprintable() for c in name))
    if bad or len(name) > 100:
        raise SpecError(field, name, "not usable as a file name (it must not contain / or \\, start with '.', be "
                        "empty, hold control characters or pass 100 characters)",
                        f'write {field} = "my-case" (letters, digits, - _ . +)')


def validate(spec: Spec) -> None:
    """Cross-field checks that single-field types cannot express. Sizes first: nothing below may allocate or generate
    more than the documented ceilings allow."""
    from .tolerance import CEILING

    m, d, b = spec.model, spec.data, spec.batch
    check_name("case.name", spec.case.name)
    ceiling = CEILING[m.dtype]
    if spec.run.rel_tolerance > ceiling:
        raise SpecError("run.rel_tolerance", spec.run.rel_tolerance,
                        f"above the {m.dtype} ceiling {ceiling:g}: a bound that wide passes real bugs",
                        f"set it to at most {ceiling:g}, or 0 to calibrate it")
    need = spec.samples_per_step * b.steps
    if need > MAX_SAMPLES:
        raise SpecError("batch", f"{need} samples", f"above the ceiling of {MAX_SAMPLES} samples per case "
                        "(micro_batch_size x grad_accum x world_size x steps)", "reduce the batching")
    from .model import parameter_shapes

    n_params = sum(math.prod(shape) for shape in parameter_shapes(spec).values())  # <= 256 layers: cheap
    limit = MAX_PARAMETERS[spec.run.device]
    if n_params > limit:
        raise SpecError("model", f"{n_params:.3g} parameters", f"above the {spec.run.device} ceiling of {limit:.3g}",
                        "use a smaller shape (model.vocab_size, hidden_size, intermediate_size, num_layers)")
    if not d.samples and need * (d.prompt_len[1] + d.response_len[1]) > MAX_GENERATED_TOKENS:
        raise SpecError("data", f"{need} samples x up to {d.prompt_len[1] + d.response_len[1]} tokens",
                        f"the generator would produce more than {MAX_GENERATED_TOKENS} tokens",
                        "reduce data.prompt_len / data.response_len or the batching")
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
    import re

    for i, pattern in enumerate(spec.optimizer.no_decay):
        try:
            re.compile(pattern)
        except re.error as e:
            raise SpecError(f"optimizer.no_decay[{i}]", pattern, f"not a regular expression ({e})",
                            "write a plain substring such as 'norm' or a valid regular expression") from None
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
    _check_supervision(spec)


def _check_supervision(spec: Spec) -> None:
    """Every optimizer step must supervise at least one token: a loss over no token is 0/0, and a fit over nothing
    is singular. (rl.mask_truncated removes truncated samples.)"""
    from . import data as D

    smp = D.samples(spec)
    b = spec.batch
    for step in range(b.steps):
        idx = [i for r in range(b.world_size) for mb in range(b.grad_accum)
               for i in D.micro_batch_indices(spec, step, r, mb)]
        if not any(D.included(spec, smp[i]) and D.token_count(spec, smp[i]) > 0 for i in idx):
            why = ("every sample of the step is truncated and rl.mask_truncated removes it"
                   if spec.rl.mask_truncated and all(not D.included(spec, smp[i]) for i in idx)
                   else "no sample of the step has a supervised target token")
            raise SpecError("data.samples" if spec.data.samples else "data", f"step {step}",
                            f"supervises no token: {why}",
                            "give every step at least one supervised response token (or data.supervise = 'all')")


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
