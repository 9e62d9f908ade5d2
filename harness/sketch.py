"""Sketches of per-parameter tensors, so the micro-batch weight fit works on real-size models.

The fit (signatures.fit_weights) solves min_w ||G - sum_k w_k C_k||: a linear least-squares problem. Applying the
same linear map S to the framework's gradient G and to every contribution C_k keeps the problem's solution when S
preserves the span of the C_k, which a random coordinate sample of a few million entries does with overwhelming
probability for K (micro-batches x ranks) of a few dozen. So the reference keeps S C_k instead of C_k (a few MB
instead of K full gradient copies of several GB), and the harness applies the same S to the framework's gradient.

S is a seeded coordinate sample per parameter (with replacement: cheap for 100M-entry tensors), its indices drawn
on the CPU from a generator seeded by the parameter's name, so the reference worker and the harness, in the same
host interpreter, draw the same indices on any device.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SKETCH_COORDINATES = 4_000_000
"""Coordinates kept over all parameters when contributions are sketched."""
FULL_CONTRIBUTIONS_BYTES = 2**30
"""Keep full per-micro-batch contributions up to this many bytes (K x parameters x 4); sketch beyond it."""

_INDEX_CACHE: dict[tuple[str, int, float, str], Any] = {}


def fraction_for(total_params: int, contributions: int, force: bool = False) -> float | None:
    """The sampled fraction of every parameter, or None when full contributions fit."""
    if not force and total_params * contributions * 4 <= FULL_CONTRIBUTIONS_BYTES:
        return None
    return min(1.0, SKETCH_COORDINATES / max(total_params, 1))


def indices(name: str, numel: int, fraction: float, device: Any = "cpu") -> torch.Tensor:
    """The sampled flat indices of parameter `name` (at least 16, at most numel draws)."""
    import torch

    key = (name, numel, fraction, str(device))
    if key not in _INDEX_CACHE:
        k = min(numel, max(16, math.ceil(numel * fraction)))
        seed = int(hashlib.sha256(f"stepdiff-sketch:{name}".encode()).hexdigest()[:12], 16)
        g = torch.Generator().manual_seed(seed)
        _INDEX_CACHE[key] = torch.randint(numel, (k,), generator=g).to(device)
    return _INDEX_CACHE[key]


def sketch_one(name: str, tensor: torch.Tensor, fraction: float) -> torch.Tensor:
    flat = tensor.reshape(-1)
    return flat[indices(name, flat.numel(), fraction, flat.device)]


def sketch(tensors: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    return {n: sketch_one(n, t, fraction) for n, t in tensors.items()}
