"""DeepSpeed's host patches (CPU, and one for CUDA hosts), shared by every adapter that runs DeepSpeed's engine
(DeepSpeed itself, OpenRLHF's strategy, TRL through accelerate). None touches the gradient path under test; one
(py-cpuinfo memoized) is for speed, not for the CPU."""

from __future__ import annotations

import importlib
import os
from typing import Any

from ..base import OpBuild, Patch

SHM_OP = Patch(
    "deepspeed.comm.torch.build_shm_op", "replaced by a no-op (CPU only)",
    "skips an 18-77 s g++ JIT of the shared-memory comm op at init_distributed; plain gloo collectives are used")
DETACH_FLAT_BUFFERS = Patch(
    "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.flatten_dense_tensors_aligned", "result .detach()ed",
    "0.18.7-0.18.9 crash at world size >= 2 with gloo on torch 2.13 (in-place write into a view of the flat bit16 "
    "buffer in the step's all-gather); 0.19.0 adds the same detach upstream; not on the gradient path")
ARCH_LIST = Patch(
    "TORCH_CUDA_ARCH_LIST (environment of the worker)", "architecture suffixes dropped ('9.0a' -> '9.0'; CUDA only)",
    "DeepSpeed's op builder (compute_capability_args, 0.19.6 on an H200 image that sets '9.0a') parses each entry "
    "as integers and fails, so its JIT ops (FusedAdam, OpenRLHF's default) never build; the suffix only enables "
    "arch-specific instructions those kernels do not use")
INTEL_STAND_INS = Patch(
    "sys.modules['intel_extension_for_pytorch'], sys.modules['oneccl_bindings_for_pytorch'], "
    "torch.distributed.elastic.agent.server.api.log/_get_socket_with_port, CPU_Accelerator._communication_backend_name",
    "empty stand-in modules, two names torch 2.13 no longer has, and the accelerator's backend name 'ccl' -> 'gloo' "
    "(deepspeed < 0.14 on CPU only)",
    "0.13's CPU accelerator refuses to load without Intel's extension and imports oneCCL's bindings, but calls neither "
    "(no release of either exists for torch 2.13: intel-extension-for-pytorch stops at 2.8.0, pinned to torch 2.8); "
    "its elastic agent imports two torch names at import time and is never used; with the backend name 'gloo', "
    "init_distributed skips building the oneCCL op (later releases fall back to gloo by themselves)")
CPUINFO_ONCE = Patch(
    "cpuinfo.get_cpu_info (py-cpuinfo, as DeepSpeed's op builder cpu_arch/simd_width and DeepSpeedCPUAdam.__init__ "
    "call it)", "memoized per worker process: the first call runs py-cpuinfo as usual, later calls get a copy of its "
    "answer",
    "each call runs py-cpuinfo in a fresh subprocess (~1.1 s; three per DeepSpeedCPUAdam, i.e. 3.4 s per engine and "
    "per fuzz example with CPU Adam); the CPU does not change inside one process, so DeepSpeed gets the same answer, "
    "which picks compile flags and a warning, not the math")
PATCHES = (SHM_OP, DETACH_FLAT_BUFFERS, ARCH_LIST, INTEL_STAND_INS, CPUINFO_ONCE)
_EARLY: list[Patch] = []


def select_accelerator(device: str) -> None:
    """DeepSpeed's CPU accelerator on CPU (set before deepspeed is imported; its auto-detection wants CUDA)."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _intel_stand_ins()


def _intel_stand_ins() -> None:
    """Before deepspeed is imported: stand-ins for the Intel packages 0.13's CPU accelerator imports."""
    import sys
    import types
    from importlib import metadata

    from stepdiff._util import version_tuple

    try:
        version = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return
    if version_tuple(version) >= (0, 14) or INTEL_STAND_INS in _EARLY:
        return
    for name in ("intel_extension_for_pytorch", "oneccl_bindings_for_pytorch"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import logging

    api = importlib.import_module("torch.distributed.elastic.agent.server.api")
    if not hasattr(api, "log"):
        api.log = logging.getLogger("torchelastic")  # type: ignore[attr-defined]
    if not hasattr(api, "_get_socket_with_port"):
        def _unused(*a: Any, **k: Any) -> Any:
            raise RuntimeError("stepdiff: DeepSpeed's elastic agent is not supported with this torch")

        api._get_socket_with_port = _unused  # type: ignore[attr-defined]
    _EARLY.append(INTEL_STAND_INS)


def skip_shm_op_build() -> list[Patch]:
    """Through importlib: `import deepspeed.comm.torch as m` binds the real torch package (an attribute of
    deepspeed.comm is named torch), so patching through it would silently do nothing."""
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    if not hasattr(comm_torch, "build_shm_op"):
        return []
    comm_torch.build_shm_op = lambda: None  # type: ignore[attr-defined]
    return [SHM_OP]


def detach_flat_buffers() -> list[Patch]:
    """Idempotent: a worker serving many specs applies it once."""
    zopt = importlib.import_module("deepspeed.runtime.zero.stage_1_and_2").DeepSpeedZeroOptimizer
    if not hasattr(zopt, "flatten_dense_tensors_aligned"):
        return []
    if not getattr(zopt, "_stepdiff_detach", False):
        original = zopt.flatten_dense_tensors_aligned

        def flatten_detached(self: Any, *a: Any, **kw: Any) -> Any:
            return original(self, *a, **kw).detach()

        zopt.flatten_dense_tensors_aligned = flatten_detached
        zopt._stepdiff_detach = True
    return [DETACH_FLAT_BUFFERS]


def memoize_cpuinfo() -> list[Patch]:
    """Idempotent. `from cpuinfo import get_cpu_info` runs at each of DeepSpeed's calls, so the package attribute is
    what they get."""
    import copy

    try:
        cpuinfo = importlib.import_module("cpuinfo")
    except ImportError:  # DeepSpeed falls back to lscpu by itself
        return []
    if not getattr(cpuinfo.get_cpu_info, "_stepdiff_memo", False):
        original = cpuinfo.get_cpu_info
        answers: list[Any] = []

        def get_cpu_info() -> Any:
            if not answers:
                answers.append(original())
            return copy.deepcopy(answers[0])

        get_cpu_info._stepdiff_memo = True  # type: ignore[attr-defined]
        setattr(cpuinfo, "get_cpu_info", get_cpu_info)  # noqa: B010 - a module attribute mypy cannot see
    return [CPUINFO_ONCE]


def _legacy_backend_name() -> None:
    """deepspeed < 0.14: its CPU accelerator always names 'ccl' (oneCCL) as the backend; gloo like later releases."""
    if INTEL_STAND_INS in _EARLY:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        if getattr(acc, "_communication_backend_name", None) == "ccl":
            acc._communication_backend_name = "gloo"


def plain_arch_list() -> list[Patch]:
    """Before any JIT build: '8.0;9.0a+PTX' -> '8.0;9.0+PTX' (only when a suffix is there)."""
    import re

    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    plain = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)
    if plain == value:
        return []
    os.environ["TORCH_CUDA_ARCH_LIST"] = plain
    return [ARCH_LIST]


def apply(device: str) -> list[Patch]:
    """The patches this device needs (the shm op only on CPU, the arch list only on CUDA): the ones applied."""
    if device == "cpu":
        _legacy_backend_name()
        return list(_EARLY) + skip_shm_op_build() + detach_flat_buffers() + memoize_cpuinfo()
    return plain_arch_list() + detach_flat_buffers() + memoize_cpuinfo()


def _op_code(builder: str) -> str:
    """Build one of DeepSpeed's ops the way DeepSpeed loads it at run time on the CPU accelerator (`XBuilder().load()`
    JIT-compiles into TORCH_EXTENSIONS_DIR; a later load in a worker finds it there)."""
    return ("import os\n"
            "os.environ.setdefault('DS_ACCELERATOR', 'cpu')\n"
            "from deepspeed.accelerator import get_accelerator\n"
            f"builder = get_accelerator().create_op_builder({builder!r})\n"
            f"assert builder is not None, 'no {builder} for this accelerator'\n"
            "builder.load()\n")


CPU_ADAM_OP = OpBuild("deepspeed.cpu_adam", _op_code("CPUAdamBuilder"),
                      "DeepSpeed's CPU Adam op (cpu_adam, used by DeepSpeedCPUAdam under offload_optimizer)")
FUSED_ADAM_CPU_OP = OpBuild("deepspeed.fused_adam_cpu", _op_code("FusedAdamBuilder"),
                            "DeepSpeed's FusedAdam op for the CPU accelerator (fused_adam)")
