"""The adapter contract: what every framework adapter (and the reference) implements, plus model/loss helpers.

An adapter class has:
- `name` and `capabilities` (class attributes, data only: `stepdiff list` prints them without importing the
  framework);
- `requirements(version)`: the packages its environment needs besides the host's exact torch;
- `unsupported(spec)`: the reason a spec knob cannot be honoured, or None (checked on the host, before any run:
  an unsupported knob is reported, never approximated or skipped silently);
- `setup(ctx)`: once per worker process (distributed init, CPU patches);
- `run(spec, init_path, ctx)`: one spec's optimizer steps through the framework's own code, returning a Record
  (only rank 0's return value is written).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from stepdiff.harness.record import Record
from stepdiff.harness.spec import Spec

if TYPE_CHECKING:
    import torch

    from stepdiff.harness.data import MicroBatch


@dataclass(frozen=True)
class Patch:
    """A monkeypatch an adapter applies to run on CPU, with the exact target and why it does not touch the math."""

    target: str
    change: str
    why: str


@dataclass(frozen=True)
class Capabilities:
    framework: str
    """The distribution name of the framework ('deepspeed'), or 'torch' for the reference."""
    runs: str
    """The exact piece of the framework that runs."""
    readouts: tuple[str, ...]
    """How gradients, loss and grad norm are read."""
    knobs: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu", "cuda")
    world_sizes: str = "1, 2 (gloo on CPU, nccl on CUDA)"
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    optimizers: tuple[str, ...] = ("sgd", "adamw")
    loss_kinds: tuple[str, ...] = ("sft",)
    pad_to: bool = False
    """Honours data.pad_to (its micro-batches come from stepdiff's collate, so extra padding reaches the model)."""
    patches: tuple[Patch, ...] = ()
    notes: tuple[str, ...] = ()


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


class Adapter:
    """Base class of adapters. Subclasses set the class attributes and override the methods."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

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
        return None

    def setup(self, ctx: WorkerContext) -> None:
        """Once per worker process."""

    def run(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Record:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by adapters. They build the model and compute the spec's loss; they are not framework math.


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


def build_model(spec: Spec, init_path: Path | None, dtype: str | None = None) -> Any:
    """A transformers LlamaForCausalLM from the spec's config, with the shared initial weights loaded strictly."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    from stepdiff.harness.model import hf_config

    cfg = LlamaConfig(**hf_config(spec))
    cfg._attn_implementation = spec.model.attn_implementation
    torch.manual_seed(spec.model.seed)
    model: Any
    if spec.loss.kind == "value":  # a value model: one scalar per token from the `score` head
        cfg.num_labels = 1
        model = LlamaForTokenClassification(cfg)
    else:
        model = LlamaForCausalLM(cfg)
    if init_path is not None:
        load_init(model, init_path)
    model.to(torch_dtype(dtype or spec.model.dtype))
    model.config.use_cache = False
    assert_no_dropout(model)
    return model


def assert_no_dropout(model: Any) -> None:
    """Every dropout must be 0: a random mask makes two runs differ by noise the fp64 calibration cannot see (same
    seed), so it would silently blur every comparison. (LlamaForTokenClassification defaults to 0.1.)"""
    import torch

    active = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if active:
        raise RuntimeError(f"dropout is active in {active[:3]}: every run must use dropout 0")


def make_optimizer(spec: Spec, params: Any) -> Any:
    """torch's SGD or AdamW configured from the spec (constant lr; clipping is applied separately)."""
    import torch

    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def load_init(model: Any, init_path: Path) -> None:
    """Load the shared initial weights; a missing or unexpected parameter name is an error."""
    from safetensors.torch import load_file

    state = load_file(str(init_path))
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"initial weights do not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")


def token_loss_sum(model: Any, mb: MicroBatch, device: Any = None) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the supervised targets of a micro-batch, and their count.

    Computed in fp32 from the model's logits regardless of the model's dtype.
    """
    import torch

    dev = device if device is not None else next(model.parameters()).device
    ids = mb.input_ids.to(dev)
    out = model(input_ids=ids, attention_mask=mb.attention_mask.to(dev), use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = ids[:, 1:]
    mask = mb.loss_mask[:, 1:].to(dev).bool()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1).to(ce.dtype)).sum(), int(mask.sum().item())


def framework_versions(*dists: str) -> dict[str, str]:
    """Installed versions of the given distributions (and torch, transformers) in this worker's environment."""
    from importlib import metadata

    out = {}
    for d in ("torch", "transformers", *dists):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            pass
    return out


def set_dist_env(ctx: WorkerContext) -> None:
    """The variables torch.distributed and DeepSpeed read (already set by torchrun; set for world size 1)."""
    os.environ.setdefault("RANK", str(ctx.rank))
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(ctx.world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
