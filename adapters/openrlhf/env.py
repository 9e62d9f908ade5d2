"""The OpenRLHF adapter's environments: the deepspeed/transformers/flash-attn pins of each release and what its SFT
path imports (OpenRLHF itself is installed --no-deps: its full requirements pull vllm, ray, wandb ...)."""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from stepdiff._util import version_tuple

# (deepspeed, transformers, flash-attn) each release pins (its wheel's Requires-Dist). Unknown releases are read from
# the wheel's metadata with `pip download --no-deps` (see release_pins).
RELEASE_PINS: dict[str, tuple[str, str, str]] = {
    "0.6.2": ("0.16.4", "4.48.3", "2.7.0.post2"),
    "0.7.0": ("0.16.5", "4.50.0", "2.7.4.post1"),
    "0.7.1": ("0.16.6", "4.51.3", "2.7.4.post1"),
    "0.8.11": ("0.17.6", "4.56.1", "2.8.3"),
    "0.9.10": ("0.18.9", "5.5.0", "2.8.3"),
    "0.10.0": ("0.18.9", "5.5.3", "2.8.3"),
    "0.10.1": ("0.18.9", "5.5.3", "2.8.3"),
    "0.10.2": ("0.18.9", "5.5.4", "2.8.3"),
    "0.10.3": ("0.18.9", "5.7.0", "2.8.3"),
    "0.10.4": ("0.19.1", "5.7.0", "2.8.3"),
    "0.11.0": ("0.19.5", "5.15.0", "2.8.3"),
    "0.11.1": ("0.19.5", "5.15.0", "2.8.3"),
    "0.11.2": ("0.19.6", "5.15.0", "2.8.3"),
}

# What the SFT path imports besides torch, deepspeed, transformers and flash-attn's Python files (measured: the CPU
# recipe). Not installed: vllm, ray, wandb, bitsandbytes, optimum, liger-kernel, ring-flash-attn, tensorboard.
SFT_PATH_PACKAGES = ["peft", "torchdata", "datasets", "pylatexenc", "sympy", "einops", "numpy", "setuptools", "wheel",
                     "packaging", "psutil", "ninja", "tqdm", "jsonlines"]




def imports_ray_on_sft_path(version: str | None) -> bool:
    """Releases before 0.10.0 import ray at module level on the SFT path (openrlhf.trainer/__init__ ->
    ppo_trainer -> ppo_utils.experience_maker): ray is installed there, imported only, never started."""
    return version is not None and version_tuple(version)[:2] < (0, 10)


@functools.cache
def release_pins(version: str | None) -> tuple[str | None, str | None, str]:
    """(deepspeed, transformers, flash-attn) pins of an OpenRLHF release; None = unpinned (newest)."""
    if version is None:
        return (None, None, "2.8.3")
    if version in RELEASE_PINS:
        return RELEASE_PINS[version]
    try:  # an unlisted release: read its wheel's Requires-Dist (pip's ordinary client, no install)
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", d,
                            f"openrlhf=={version}"], check=True, capture_output=True, timeout=120)
            whl = next(Path(d).glob("*.whl"))
            with zipfile.ZipFile(whl) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                text = z.read(meta).decode()
    except Exception:
        return (None, None, "2.8.3")
    pins: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            req = line.split(":", 1)[1].strip()
            for dist in ("deepspeed", "transformers", "flash-attn"):
                if req.startswith(dist + "=="):
                    pins[dist] = req.split("==", 1)[1].strip()
    return (pins.get("deepspeed"), pins.get("transformers"), pins.get("flash-attn", "2.8.3"))

