"""The record an adapter returns for one spec: per optimizer step the framework's reported loss and grad norm,
per-parameter gradients after accumulation and before clipping (unsharded, fp32, canonical names), parameters after
the step, the optimizer state after the step where the framework exposes it (Adam's exp_avg / exp_avg_sq, SGD's
momentum_buffer, gathered when sharded or offloaded; the optimizer's step counter); plus metadata (versions, code
path, the optimizer that ran, where each reported number came from, device, world size, warnings, timings).

On disk: `record.json` (metadata and scalars) and `tensors.safetensors` (keys `grad/<step>/<name>`,
`param/<step>/<name>`, `state/<step>/<name>/<key>`, and adapter extras such as the reference's
`contrib/<step>/<rank>/<micro>/<name>`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1


@dataclass
class StepRecord:
    loss: float
    """The loss the framework reports for the step (NaN when it reports none)."""
    grad_norm: float | None
    """The global grad norm the framework reports (before clipping), or None when it reports none."""
    grads: dict[str, torch.Tensor]
    """Per-parameter gradients after accumulation, before clipping: unsharded, fp32, canonical names."""
    params: dict[str, torch.Tensor]
    """Parameters after the optimizer step: unsharded, fp32, canonical names."""
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Optimizer state after the step, per parameter: {'exp_avg': ..., 'exp_avg_sq': ...} (AdamW) or
    {'momentum_buffer': ...} (SGD); unsharded fp32; empty when the framework does not expose it."""
    opt_step: int | None = None
    """The optimizer's own step counter after the step (Adam's `step`), or None when not exposed."""


@dataclass
class RecordMeta:
    adapter: str
    framework_version: str
    code_path: str
    """The exact piece of the framework that ran, e.g. 'deepspeed.initialize + DeepSpeedEngine.backward/step'."""
    readout: str
    """How gradients were read, e.g. 'safe_get_full_grad before the boundary step()'."""
    device: str
    world_size: int
    dtype: str
    versions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    patches: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    optimizer: str = ""
    """The optimizer that ran and who built it, e.g. 'deepspeed.ops.adam.DeepSpeedCPUAdam (DeepSpeed, from the
    config's optimizer block)' or 'torch.optim.AdamW (handed in by the adapter)'."""
    sources: dict[str, str] = field(default_factory=dict)
    """Where each reported number came from: key 'loss' | 'grad_norm' | 'grads' | 'params' | 'state' -> 'framework'
    (the framework computed it), 'adapter' (the adapter fed or computed it: not evidence about the framework) or
    'none'. Only 'framework' numbers are compared; a missing key counts as 'framework'."""

    param_dtype: str = ""
    """The precision of the recorded parameters when it is not the spec's dtype: 'float32' when a low-precision
    run records its float32 master weights (then updates are checked at float32 resolution)."""

    def source(self, key: str) -> str:
        return self.sources.get(key, "framework")


@dataclass
class Record:
    meta: RecordMeta
    steps: list[StepRecord]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Adapter-specific tensors (the reference's per-micro-batch contributions)."""

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        scalars = []
        for s, st in enumerate(self.steps):
            for name, t in st.grads.items():
                tensors[f"grad/{s}/{name}"] = _fp32_or_64(t)
            for name, t in st.params.items():
                tensors[f"param/{s}/{name}"] = _fp32_or_64(t)
            for name, kv in st.state.items():
                for key, t in kv.items():
                    tensors[f"state/{s}/{name}/{key}"] = _fp32_or_64(t)
            scalars.append({"loss": _num(st.loss), "grad_norm": _num(st.grad_norm), "opt_step": st.opt_step})
        for key, t in self.extras.items():
            tensors[key] = t.detach().to("cpu").contiguous()
        save_file(tensors, str(d / "tensors.safetensors"))
        doc = {"format": FORMAT_VERSION, "meta": asdict(self.meta), "steps": scalars}
        (d / "record.json").write_text(json.dumps(doc, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> Record:
        from safetensors.torch import load_file

        d = Path(directory)
        doc = json.loads((d / "record.json").read_text())
        tensors = load_file(str(d / "tensors.safetensors"))
        steps = []
        for s, sc in enumerate(doc["steps"]):
            grads = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"grad/{s}/")}
            params = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"param/{s}/")}
            state: dict[str, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith(f"state/{s}/"):
                    name, key = k.split("/", 2)[2].rsplit("/", 1)
                    state.setdefault(name, {})[key] = v
            loss = float(sc["loss"]) if sc["loss"] is not None else math.nan
            norm = float(sc["grad_norm"]) if sc["grad_norm"] is not None else None
            steps.append(StepRecord(loss=loss, grad_norm=norm, grads=grads, params=params, state=state,
                                    opt_step=sc.get("opt_step")))
        extras = {k: v for k, v in tensors.items() if not k.startswith(("grad/", "param/", "state/"))}
        return cls(meta=RecordMeta(**doc["meta"]), steps=steps, extras=extras)


def _fp32_or_64(t: torch.Tensor) -> torch.Tensor:
    """Records hold fp32 (fp64 only for the reference's own calibration run)."""
    import torch

    t = t.detach().to("cpu")
    return (t if t.dtype == torch.float64 else t.float()).contiguous()


def _num(x: float | None) -> float | str | None:
    """JSON has no NaN/Inf: keep them visible as strings so validation can flag them."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)
