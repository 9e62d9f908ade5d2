"""The adapter contract: what every framework adapter (and the reference) implements.

An adapter class has:
- `name`, `capabilities` and `knobs` (class attributes, data only: `stepdiff list` and `stepdiff spec-help` print them
  without importing the framework);
- `requirements(version)`, `install_steps(version)`, `build_env(version)`: how its environment is built (torch is
  pinned by the harness, never listed);
- `unsupported(spec, version)`: the reason a spec knob cannot be honoured, or None (checked on the host, before any
  run: an unsupported knob is reported, never approximated or skipped silently): the declared capabilities, then the
  adapter's own `unsupported_knobs`. Inside the worker, a knob the
  installed release turns out not to take raises `Unsupported` (the same verdict, exit 4);
- `setup(ctx)`: once per worker process (distributed init, CPU patches);
- `drive(spec, init_path, ctx)`: one spec's optimizer steps through the framework's own code path, returning a
  `Driven` result. `run()` (this base class) wraps it: the world-size check and the record metadata every adapter
  shares. Only rank 0's record is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from stepdiff.harness.record import Record, RecordMeta, StepRecord
from stepdiff.harness.spec import Spec

if TYPE_CHECKING:
    import torch


class Unsupported(Exception):
    """Raised inside a worker when the installed release cannot take a knob of the spec (e.g. its config class has no
    such field). The harness reports it as the `unsupported` verdict with this message, never as a pass."""


class ReleaseLookupError(Exception):
    """Raised on the host by `requirements()` / `install_steps()` when what a release needs cannot be determined
    (e.g. the dependency pins of an unlisted release cannot be read). The harness reports it as an environment that
    cannot be built (a one-line usage error): never an unpinned install that tests something else."""


@dataclass(frozen=True)
class Patch:
    """A monkeypatch an adapter applies to run on CPU, with the exact target and why it does not touch the math.

    Each patch is a named module-level object; the functions that apply patches return the Patch objects they applied
    and the record lists their targets."""

    target: str
    change: str
    why: str


@dataclass(frozen=True)
class OpBuild:
    """A JIT-compiled framework op (e.g. DeepSpeed's CPU Adam) built ahead of time in the framework's environment, so
    its minutes of g++ are paid once, with progress, and never inside a timed run."""

    name: str
    """Unique name, e.g. 'deepspeed.cpu_adam'."""
    code: str
    """Python source run with the environment's python (TORCH_EXTENSIONS_DIR set to the environment's own)."""
    what: str
    """One line for the progress message, e.g. "DeepSpeed's CPU Adam (cpu_adam)"."""


@dataclass(frozen=True)
class Capabilities:
    framework: str
    """The distribution name of the framework ('deepspeed'), or 'torch' for the reference."""
    runs: str
    """The exact piece of the framework that runs."""
    readouts: tuple[str, ...]
    """How gradients, loss and grad norm are read."""
    knobs: tuple[str, ...] = ()
    """Names of the adapter's knobs (the fields of its knob dataclass: `knob_names(Knobs)`)."""
    devices: tuple[str, ...] = ("cpu", "cuda")
    world_sizes: str = "1, 2 (gloo on CPU, nccl on CUDA)"
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    optimizers: tuple[str, ...] = ("sgd", "adamw")
    loss_kinds: tuple[str, ...] = ("sft",)
    pad_to: bool = False
    """Honours data.pad_to (its micro-batches come from stepdiff's collate, so extra padding reaches the model)."""
    patches: tuple[Patch, ...] = ()
    notes: tuple[str, ...] = ()


def knob_names(cls: Any) -> tuple[str, ...]:
    """The field names of a knob dataclass, in order (the single source of an adapter's knob list)."""
    return tuple(f.name for f in fields(cls))


@dataclass
class WorkerContext:
    """What a worker process knows about itself."""

    rank: int
    world_size: int
    local_rank: int
    device: str
    """'cpu' or 'cuda'."""
    scratch: Path
    """A per-worker scratch directory (checkpoints, framework output)."""
    state: dict[str, Any] = field(default_factory=dict)
    """Adapter-owned state that lives as long as the worker process (e.g. 'dist initialised')."""

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(f"cuda:{self.local_rank}") if self.device == "cuda" else torch.device("cpu")


@dataclass
class Driven:
    """What a code path's driver returns: the steps it took and how (the adapter base turns it into a Record)."""

    steps: list[StepRecord]
    framework_version: str
    code_path: str
    """The exact piece of the framework that ran."""
    readout: str
    """How the gradients were read."""
    patches: list[str] = field(default_factory=list)
    """Targets of the patches in force during the run."""
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    optimizer: str = ""
    """The optimizer that ran and who built it (RecordMeta.optimizer)."""
    sources: dict[str, str] = field(default_factory=dict)
    """Where each reported number came from (RecordMeta.sources): 'framework', 'adapter' or 'none'."""
    param_dtype: str = ""
    """'float32' when the steps' parameters are the framework's float32 master weights of a low-precision run."""


class Adapter:
    """Base class of adapters. Subclasses set the class attributes and implement `drive` (or override `run`)."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    version_dists: ClassVar[tuple[str, ...]] = ()
    """Distributions whose installed versions go into every record (torch and transformers always do)."""

    @classmethod
    def requirements(cls, version: str | None) -> list[str]:
        """Packages to install into the environment (torch is pinned by the harness, never listed here)."""
        return []

    @classmethod
    def build_env(cls, version: str | None) -> dict[str, str]:
        """Extra environment variables for the installer (e.g. DS_BUILD_OPS=0)."""
        return {}

    @classmethod
    def install_steps(cls, version: str | None) -> list[list[str]]:
        """Further `uv pip install` argument lists run after the main install, in order, with the same torch
        constraint and find-links (e.g. ["--no-deps", "openrlhf==0.10.2"] or ["--no-build-isolation", "pkg==1"])."""
        return []

    @classmethod
    def ops(cls, version: str | None, spec: Spec | None = None) -> tuple[OpBuild, ...]:
        """JIT-compiled framework ops a run of `spec` would compile (every op the adapter may need when `spec` is
        None): the harness builds them in the environment before the first run, outside its timeout."""
        return ()

    @classmethod
    def unsupported(cls, spec: Spec, version: str | None = None) -> str | None:
        """Why this adapter cannot honour `spec` at release `version` (None = newest), or None. Checked on the host,
        without the framework, before any environment is built."""
        caps = cls.capabilities
        if spec.model.dtype not in caps.dtypes:
            return f"model.dtype = {spec.model.dtype!r} is not supported (supported: {', '.join(caps.dtypes)})"
        if spec.optimizer.name not in caps.optimizers:
            supported = ", ".join(caps.optimizers)
            return f"optimizer.name = {spec.optimizer.name!r} is not supported (supported: {supported})"
        if spec.loss.kind not in caps.loss_kinds:
            return f"loss.kind = {spec.loss.kind!r} is not supported (supported: {', '.join(caps.loss_kinds)})"
        if spec.run.device not in caps.devices:
            return f"run.device = {spec.run.device!r} is not supported"
        if spec.data.pad_to and not caps.pad_to:
            return "data.pad_to: this adapter's framework pads its own batches (extra padding cannot be injected)"
        return cls.unsupported_knobs(spec, version)

    @classmethod
    def unsupported_knobs(cls, spec: Spec, version: str | None) -> str | None:
        """The adapter's own checks, after the capability checks above passed (override this, not `unsupported`)."""
        return None

    def setup(self, ctx: WorkerContext) -> None:
        """Once per worker process."""

    def drive(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Driven:
        """One spec's optimizer steps through the framework's own code path."""
        raise NotImplementedError

    def run(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Record:
        import time

        from .common import framework_versions

        t0 = time.perf_counter()
        if ctx.world_size != spec.batch.world_size:
            raise RuntimeError(f"worker world size {ctx.world_size} != batch.world_size {spec.batch.world_size}")
        out = self.drive(spec, init_path, ctx)
        meta = RecordMeta(
            adapter=self.name, framework_version=out.framework_version, code_path=out.code_path,
            readout=out.readout, device=ctx.device, world_size=ctx.world_size, dtype=spec.model.dtype,
            versions=framework_versions(*self.version_dists), warnings=out.warnings,
            timings={"run_s": time.perf_counter() - t0, **out.timings}, patches=out.patches, extra=out.extra,
            optimizer=out.optimizer, sources=out.sources, param_dtype=out.param_dtype,
        )
        return Record(meta=meta, steps=out.steps)
