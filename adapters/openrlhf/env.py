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

from ..base import ReleaseLookupError

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


FLASH_ATTN = "2.8.3"
"""flash-attn (sdist, no kernels: only its pure-torch bert_padding is imported) where a release does not pin one."""


@functools.cache
def release_pins(version: str | None) -> tuple[str, str, str]:
    """(deepspeed, transformers, flash-attn) requirements of an OpenRLHF release (None = the newest release), e.g.
    ('deepspeed==0.18.9', 'transformers==5.5.4', 'flash-attn==2.8.3'). Listed releases come from RELEASE_PINS; any
    other is read from its wheel's Requires-Dist. A release whose pins cannot be read is a `ReleaseLookupError`,
    never an unpinned install (that would test another deepspeed than the release ships with)."""
    if version in RELEASE_PINS:
        ds, tf, fa = RELEASE_PINS[version]
        return f"deepspeed=={ds}", f"transformers=={tf}", f"flash-attn=={fa}"
    wanted = f"openrlhf=={version}" if version else "openrlhf"
    try:  # an unlisted release: read its wheel's Requires-Dist (pip's ordinary client, no install)
        text = _wheel_metadata(wanted)
    except Exception as e:
        raise ReleaseLookupError(
            f"the deepspeed/transformers pins of {wanted} could not be read from its wheel ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else 'no detail'}); add the release to "
            "RELEASE_PINS in stepdiff/adapters/openrlhf/env.py or pin both in the version set, e.g. "
            f"-f '{wanted},deepspeed==X,transformers==Y'") from None
    reqs = requires_dist(text)
    missing = [d for d in ("deepspeed", "transformers") if d not in reqs]
    if missing:
        raise ReleaseLookupError(f"{wanted} declares no {' and no '.join(missing)} requirement in its wheel metadata; "
                                 "pin them in the version set")
    return reqs["deepspeed"], reqs["transformers"], reqs.get("flash-attn", f"flash-attn=={FLASH_ATTN}")


def _wheel_metadata(requirement: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d", d,
                        requirement], check=True, capture_output=True, text=True, timeout=120)
        whl = next(Path(d).glob("*.whl"))
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            return z.read(meta).decode()


def requires_dist(metadata: str) -> dict[str, str]:
    """{distribution: its requirement} of the unconditional Requires-Dist lines of a wheel's METADATA."""
    out: dict[str, str] = {}
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and ";" not in line:
            req = line.split(":", 1)[1].strip().replace(" ", "").replace("(", "").replace(")", "")
            name = req
            for sep in ("==", ">=", "<=", "~=", "!=", ">", "<", "["):
                name = name.split(sep, 1)[0]
            out[name.lower().replace("_", "-")] = req
    return out
