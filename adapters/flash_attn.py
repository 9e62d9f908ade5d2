"""flash-attn without its CUDA kernels, shared by the adapters whose frameworks import flash-attn's pure-torch
`bert_padding` (OpenRLHF at module level, verl on its remove-padding path).

flash-attn is installed from its sdist with FLASH_ATTENTION_SKIP_CUDA_BUILD: its Python files are there, its
`flash_attn_2_cuda` extension is not, and `flash_attn/__init__` imports it. A stub module whose attributes raise
lets the pure-torch pieces import; no kernel is ever called (a call would raise, never compute something else).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


def install_kernel_stub() -> bool:
    """Put the `flash_attn_2_cuda` stub in place where flash-attn is installed without its kernels. True when the
    stub is (now or already) in place, False where flash-attn is absent or has real kernels."""
    current = sys.modules.get("flash_attn_2_cuda")
    if current is not None:
        return bool(getattr(current, "__stepdiff_stub__", False))
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        importlib.import_module("flash_attn_2_cuda")
        return False
    except ImportError:
        pass
    stub = types.ModuleType("flash_attn_2_cuda")

    def __getattr__(name: str) -> Any:  # noqa: N807
        # AttributeError (not RuntimeError): hasattr()/inspect probe modules for __file__ and the like
        raise AttributeError(f"flash_attn_2_cuda.{name}: flash-attn CUDA kernels are not built in this environment")

    stub.__getattr__ = __getattr__  # type: ignore[attr-defined,method-assign]
    stub.__stepdiff_stub__ = True  # type: ignore[attr-defined]
    sys.modules["flash_attn_2_cuda"] = stub
    return True
