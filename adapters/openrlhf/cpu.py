"""The OpenRLHF adapter's patches: CPU glue, none on the loss/gradient path (listed in `stepdiff list`)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from .. import flash_attn
from ..base import Patch
from ..deepspeed import cpu as deepspeed_cpu

FLASH_ATTN_STUB = Patch(
    "sys.modules['flash_attn_2_cuda']", "a stub module whose attributes raise AttributeError",
    "flash_attn/__init__ imports its CUDA extension; OpenRLHF imports flash_attn.bert_padding (pure torch) at "
    "module level. flash-attn is installed from its sdist without kernels; no kernel is ever called")
CUDA_SET_DEVICE = Patch(
    "torch.cuda.set_device", "no-op on CPU",
    "DeepspeedStrategy.setup_distributed calls torch.cuda.set_device(LOCAL_RANK) unconditionally")
CUDA_CURRENT_DEVICE = Patch(
    "torch.cuda.current_device", "returns 'cpu' on CPU",
    "strategy.all_reduce moves the progress-bar logs to torch.cuda.current_device() every micro-step")
CUDA_SYNCHRONIZE = Patch(
    "torch.cuda.synchronize", "no-op on CPU",
    "torch_dist_barrier_and_cuda_sync (save_model / save_ckpt) synchronises CUDA after its barrier")
CLI_ARGS = Patch(
    "argparse.ArgumentParser.parse_args (during the train_sft CLI only)",
    "the CLI's arguments are built from the parser's own option table (dotted or flat spelling); for fp32, "
    "'fp32' is added to the choices of --ds.param_dtype/--param_dtype",
    "OpenRLHF's CLI offers only bf16/fp16; fp32 is DeepSpeed's plain fp32 path (bf16/fp16 disabled)")
FP32_DTYPE = Patch(
    "openrlhf.utils.utils.convert_to_torch_dtype (and the names imported from it)",
    "'fp32' -> torch.float32 (bf16/fp16 unchanged)",
    "only reached with model.dtype = float32; loads the model in fp32 instead of raising")
TORCH_ADAM = Patch(
    "deepspeed.initialize (during the CLI run, knob adam_impl = 'torch' only)",
    "adds optimizer.params.torch_adam = true and zero_force_ds_cpu_optimizer = false to OpenRLHF's config",
    "DeepSpeed's own documented switch to torch.optim.AdamW instead of its JIT-compiled CPU Adam ops (saves a "
    "1-4 min compile per environment); the gradients are read before the optimizer runs")
PATCHES = (FLASH_ATTN_STUB, CUDA_SET_DEVICE, CUDA_CURRENT_DEVICE, CUDA_SYNCHRONIZE, *deepspeed_cpu.PATCHES, CLI_ARGS,
           FP32_DTYPE, TORCH_ADAM)


def apply_cpu_patches(device: str) -> list[Patch]:
    """The process-wide patches. Returns the ones actually applied."""
    import torch

    applied = [FLASH_ATTN_STUB] if flash_attn.install_kernel_stub() else []
    if device == "cpu":
        torch.cuda.set_device = lambda *a, **k: None
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
        torch.cuda.synchronize = lambda *a, **k: None
        applied += [CUDA_SET_DEVICE, CUDA_CURRENT_DEVICE, CUDA_SYNCHRONIZE]
    return applied + deepspeed_cpu.apply(device)


def patch_fp32_dtype() -> bool:
    """convert_to_torch_dtype('fp32') -> float32, in openrlhf.utils.utils and every module that imported it."""
    import torch

    try:
        utils = importlib.import_module("openrlhf.utils.utils")
    except ImportError:
        return False
    original = getattr(utils, "convert_to_torch_dtype", None)
    if original is None or getattr(original, "_stepdiff", False):
        return original is not None

    def convert(param_dtype: str) -> Any:
        if param_dtype == "fp32":
            return torch.float32
        return original(param_dtype)

    convert._stepdiff = True  # type: ignore[attr-defined]
    for name, mod in list(sys.modules.items()):
        if name.startswith("openrlhf") and getattr(mod, "convert_to_torch_dtype", None) is original:
            mod.convert_to_torch_dtype = convert  # type: ignore[attr-defined]
    return True



def import_and_patch_fp32() -> None:
    """Import the CLI's modules first so every module that imported convert_to_torch_dtype gets the fp32 case."""
    importlib.import_module("openrlhf.cli.train_sft")
    patch_fp32_dtype()
    sys.modules.pop("openrlhf.cli.train_sft", None)  # runpy executes it afresh as __main__
