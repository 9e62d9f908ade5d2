"""CPU support for the verl adapter: verl's own plugin API where the release has one, the smallest patches elsewhere.

Everything here runs inside a verl worker environment; nothing is imported at module import time except the
standard library. Each patch is a named `Patch`; each function returns the patches it applied. None of these touches
the loss, its aggregation, the backward or the optimizer step.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from .. import flash_attn
from ..base import Patch

PLATFORM = Patch(
    "verl.plugin.platform (PlatformCPU)", "a CPU platform registered with PlatformRegistry.register('cpu') and "
    "set_platform (verl >= 0.9)", "verl's own plugin API; otherwise it falls back to 'nvidia' and calls torch.cuda; "
    "device placement only")
ATTN_CONFIG = Patch(
    "HFModelConfig.override_config.attn_implementation", "the spec's attention kernel (config only)",
    "the default is flash_attention_2, which needs flash-attn and a GPU")
ENGINE_REGISTRY = Patch(
    "verl.workers.engine.EngineRegistry (device 'cpu')", "FSDP engines registered for device 'cpu' (0.7/0.8); "
    "VERL_ENGINE_DEVICE=cuda for the lookup (0.9)", "the registry keys engines on cuda/npu only; lookup only")
FSDP1_SYNC = Patch(
    "torch.distributed.fsdp._init_utils._check_module_states_for_sync_module_states", "no-op (FSDP1 only)",
    "torch refuses sync_module_states with CPU parameters; gloo broadcasts them fine")
FLASH_ATTN_KERNELS = Patch(
    "sys.modules['flash_attn_2_cuda']", "a stub module whose attributes raise AttributeError",
    "flash-attn is installed from its sdist without CUDA kernels; flash_attn/__init__ imports the kernel module, and "
    "verl's remove-padding path imports flash_attn.bert_padding (pure torch: unpad_input, pad_input, "
    "index_first_axis). No kernel is ever called")
ATTENTION_UTILS = Patch(
    "verl.utils.attention_utils._get_attention_functions", "flash_attn.bert_padding's functions, what its CUDA branch "
    "imports (0.6.x only)", "0.6 imports them only when CUDA is available and fails on a CPU host")
QWEN_VL_UTILS = Patch(
    "sys.modules['qwen_vl_utils']", "a stub whose functions raise (0.7.0 only)",
    "0.7.0's multiturn_sft_dataset imports vision_utils -> qwen_vl_utils -> torchvision at module level; no image or "
    "video is processed")
ATTN_KERNEL = Patch(
    "verl.trainer.fsdp_sft_trainer.AutoModelForCausalLM.from_pretrained", "the spec's attention kernel (legacy SFT "
    "trainer)", "the trainer hard-codes attn_implementation='flash_attention_2' (needs a GPU)")
PRECISION = Patch(
    "verl.trainer.fsdp_sft_trainer.MixedPrecision/MixedPrecisionPolicy", "param_dtype = the spec's dtype (fp32)",
    "the legacy SFT trainer hard-codes bf16 FSDP parameters; the spec is fp32 everywhere (with AUTOCAST)")
FSDP1_ORIG_PARAMS = Patch(
    "verl.trainer.fsdp_sft_trainer.FSDP", "FSDP1 with use_orig_params=True (read-out only)",
    "the trainer wraps with use_orig_params=False, under which torch cannot summon per-parameter gradients; the math "
    "is the same")
AUTOCAST = Patch(
    "<module>.torch.autocast", "a disabled torch.autocast, only in the modules that hard-code bf16 autocast "
    "(0.7 engine transformer_impl, 0.5/0.6 fsdp_sft_trainer)",
    "fp32 everywhere: the hard-coded bf16 autocast really computes in bf16 (on CPU too) and moves gradients by ~4e-3")
CPU_MEMORY = Patch(
    "torch.cpu memory statistics", "memory_allocated / max_memory_* etc. return 0 where torch.cpu lacks them",
    "verl logs GPU memory; logging only")
VALUEHEAD_LOADER = Patch(
    "verl.utils.model.load_valuehead_model", "AutoModelForTokenClassification.from_pretrained with the spec's "
    "attention kernel (0.8/0.9)", "the release hard-codes flash_attention_2")
RAY_STUB = Patch("ray", "a stub module (ray is not installed)",
                 "verl imports ray at module level; nothing ray-backed runs")
PATCHES = (PLATFORM, ATTN_CONFIG, ENGINE_REGISTRY, FSDP1_SYNC, FLASH_ATTN_KERNELS, ATTENTION_UTILS, QWEN_VL_UTILS,
           ATTN_KERNEL, PRECISION, FSDP1_ORIG_PARAMS, AUTOCAST, CPU_MEMORY, VALUEHEAD_LOADER, RAY_STUB)

APPLIED: set[Patch] = set()
"""Every patch applied in this process (patches persist across the runs a worker serves)."""


def _applied(patches: list[Patch]) -> list[Patch]:
    APPLIED.update(patches)
    return patches

# ----------------------------------------------------------------------------------------------------------------
# RAY_STUB: a stub `ray` (verl imports it at module level; nothing ray-backed runs here)


class _StubMeta(type):
    """A class that stands for any ray attribute: calling it with one callable returns the callable (decorators such
    as @ray.remote), any other call or attribute gives another stub; isinstance(x, stub) is always False."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub_class(f"{cls.__name__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return cls


def _stub_class(name: str) -> Any:
    return _StubMeta(name, (), {})


class _RayStubLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        mod = types.ModuleType(spec.name)
        mod.__path__ = []  # a package: `import ray.util.x` works
        mod.__stepdiff_stub__ = True  # type: ignore[attr-defined]

        def __getattr__(name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return _stub_class(f"{spec.name}.{name}")

        mod.__getattr__ = __getattr__  # type: ignore[method-assign]
        mod.is_initialized = lambda: False  # type: ignore[attr-defined]
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _RayStubFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "ray" or fullname.startswith("ray."):
            return importlib.machinery.ModuleSpec(fullname, _RayStubLoader(), is_package=True)
        return None


def install_ray_stub() -> list[Patch]:
    """Only when ray is not installed (the adapter's environments leave it out: 240 MB, never used)."""
    if importlib.util.find_spec("ray") is not None and not getattr(sys.modules.get("ray"), "__stepdiff_stub__", False):
        return []
    if not any(isinstance(f, _RayStubFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RayStubFinder())
    return _applied([RAY_STUB])


# ----------------------------------------------------------------------------------------------------------------
# PLATFORM: verl >= 0.9 CPU platform through verl.plugin.platform (PlatformRegistry.register + set_platform)


def install_cpu_platform() -> list[Patch]:
    try:
        from verl.plugin.platform import PlatformBase, PlatformRegistry, set_platform
    except ImportError:
        return []
    import contextlib

    import torch

    def _zero(*a: Any, **k: Any) -> int:
        return 0

    def _noop(*a: Any, **k: Any) -> None:
        return None

    device_module = types.SimpleNamespace(
        is_available=lambda: True, current_device=lambda: "cpu", device_count=lambda: 1, set_device=_noop,
        synchronize=_noop, empty_cache=_noop, ipc_collect=_noop, manual_seed=torch.manual_seed,
        manual_seed_all=torch.manual_seed, memory_allocated=_zero, memory_reserved=_zero,
        max_memory_allocated=_zero, max_memory_reserved=_zero, reset_peak_memory_stats=_noop,
        mem_get_info=lambda *a, **k: (0, 0), get_rng_state=torch.get_rng_state, set_rng_state=torch.set_rng_state,
        current_stream=lambda *a, **k: torch.cpu.current_stream(), stream=torch.cpu.stream, Stream=torch.cpu.Stream,
        Event=torch.cpu.Event if hasattr(torch.cpu, "Event") else _noop, is_bf16_supported=lambda *a, **k: True,
        get_device_name=lambda *a, **k: "cpu", memory_stats=lambda *a, **k: {},
    )

    class PlatformCPU(PlatformBase):  # type: ignore[misc, valid-type]
        """stepdiff's CPU platform for verl's plugin API (gloo, torch's CPU device)."""

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> Any:
            return device_module

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            return True

        def current_device(self) -> Any:
            return "cpu"  # used as `.to(get_device_id())` and FSDP's device_id

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            pass

        def synchronize(self, device_index: Any = None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def get_device_capability(self, device_index: int = 0) -> tuple[Any, Any]:
            return (None, None)

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        def nvtx_range(self, msg: str) -> Any:
            return contextlib.nullcontext()

        def profiler_start(self) -> None:
            pass

        def profiler_stop(self) -> None:
            pass

        def ray_resource_name(self) -> str:
            return "CPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    PlatformRegistry.register(platform="cpu")(PlatformCPU)
    set_platform(PlatformCPU())
    return _applied([PLATFORM])


# ----------------------------------------------------------------------------------------------------------------
# ENGINE_REGISTRY: engine registry keyed on cuda/npu only (0.7/0.8: register the FSDP engines for device 'cpu')


def register_cpu_engines() -> list[Patch]:
    try:
        from verl.workers.engine import EngineRegistry
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead
    except ImportError:
        return []
    from verl.utils.device import get_device_name

    device = get_device_name()
    done = []
    for model_type, cls in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        registry = getattr(EngineRegistry, "_engines", None)
        try:
            if registry is not None and registry.get(model_type, {}).get("fsdp2", {}).get(device) is cls:
                continue
        except AttributeError:
            pass
        EngineRegistry.register(model_type=model_type, backend=["fsdp", "fsdp2"], device=device)(cls)
        done.append(model_type)
    return _applied([ENGINE_REGISTRY]) if done else []


# ----------------------------------------------------------------------------------------------------------------
# FLASH_ATTN_KERNELS: flash-attn is installed from its sdist without CUDA kernels. verl's remove-padding path
# (verl.utils.attention_utils, 0.5-0.8 unconditionally, 0.9 when present) imports flash_attn.bert_padding, which is
# pure torch; flash_attn/__init__ imports the kernel module first. ATTENTION_UTILS: 0.6.x picks flash_attn only when
# CUDA is available and fails on CPU: it gets flash_attn.bert_padding's functions, the ones its CUDA branch imports.


def install_flash_attn_stub() -> list[Patch]:
    """A `flash_attn_2_cuda` module whose attributes raise: only where flash-attn is installed without kernels."""
    return _applied([FLASH_ATTN_KERNELS]) if flash_attn.install_kernel_stub() else []


def patch_attention_utils() -> list[Patch]:
    try:
        au = importlib.import_module("verl.utils.attention_utils")
    except ImportError:
        return []
    if not hasattr(au, "_get_attention_functions"):
        return []
    try:
        au._get_attention_functions()
        return []  # the release imports flash_attn.bert_padding itself (0.5, 0.7-0.9)
    except (NameError, UnboundLocalError):  # 0.6: neither its CUDA nor its NPU branch ran
        pass
    from flash_attn.bert_padding import index_first_axis, pad_input, rearrange, unpad_input

    functions = (index_first_axis, pad_input, rearrange, unpad_input)
    au._get_attention_functions = lambda: functions  # type: ignore[attr-defined]
    return _applied([ATTENTION_UTILS])


# ----------------------------------------------------------------------------------------------------------------
# QWEN_VL_UTILS: 0.7.0's multiturn_sft_dataset imports vision_utils, which imports qwen_vl_utils (and torchvision) at
# module level; no image or video is ever processed here.


def install_qwen_vl_utils_stub() -> list[Patch]:
    if importlib.util.find_spec("qwen_vl_utils") is not None or "qwen_vl_utils" in sys.modules:
        return []
    stub = types.ModuleType("qwen_vl_utils")

    def _unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("qwen_vl_utils is not installed: no image/video processing in this environment")

    stub.fetch_image = stub.fetch_video = _unavailable  # type: ignore[attr-defined]
    sys.modules["qwen_vl_utils"] = stub
    return _applied([QWEN_VL_UTILS])


# ----------------------------------------------------------------------------------------------------------------
# Legacy fsdp_sft_trainer (<= 0.7.0) hard-codes, in its own module namespace: attn_implementation="flash_attention_2"
# (ATTN_KERNEL), bf16 FSDP param dtype (PRECISION; with AUTOCAST for its bf16 autocast) and FSDP1 with
# use_orig_params=False (FSDP1_ORIG_PARAMS: per-parameter gradients cannot be summoned otherwise). Each is a context
# manager that restores the module's names afterwards.


@contextlib.contextmanager
def legacy_sft_trainer_patches(fst: Any, attn_implementation: str, param_dtype: Any) -> Iterator[list[Patch]]:
    real_auto, real_mp, real_mpp, real_fsdp = (fst.AutoModelForCausalLM, fst.MixedPrecision, fst.MixedPrecisionPolicy,
                                               fst.FSDP)

    class _AutoModelForCausalLM:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            kwargs["attn_implementation"] = attn_implementation
            return real_auto.from_pretrained(*args, **kwargs)

    def mixed_precision(**kwargs: Any) -> Any:
        return real_mp(**{**kwargs, "param_dtype": param_dtype})

    def mixed_precision_policy(**kwargs: Any) -> Any:
        return real_mpp(**{**kwargs, "param_dtype": param_dtype})

    class _FSDP(real_fsdp):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "use_orig_params": True})

    fst.AutoModelForCausalLM, fst.MixedPrecision, fst.MixedPrecisionPolicy, fst.FSDP = (
        _AutoModelForCausalLM, mixed_precision, mixed_precision_policy, _FSDP)
    try:
        yield _applied([ATTN_KERNEL, PRECISION, FSDP1_ORIG_PARAMS])
    finally:
        fst.AutoModelForCausalLM, fst.MixedPrecision, fst.MixedPrecisionPolicy, fst.FSDP = (
            real_auto, real_mp, real_mpp, real_fsdp)


# ----------------------------------------------------------------------------------------------------------------
# AUTOCAST: hard-coded bf16 torch.autocast (0.5/0.6 fsdp_sft_trainer, 0.7 engine): disabled (the spec is fp32)


def patch_cpu_autocast(modules: list[str]) -> list[Patch]:
    """Give the named verl modules a `torch` whose `autocast` is disabled (fp32 runs; on CPU the hard-coded bf16
    autocast really computes in bf16). Only those modules see it; torch itself is untouched."""
    import torch

    class _Fp32Autocast(torch.autocast):  # type: ignore[misc, name-defined]
        def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
            kwargs["enabled"] = False
            super().__init__(device_type, *args, **kwargs)

    proxy = types.ModuleType("torch")
    proxy.__dict__.update({k: v for k, v in torch.__dict__.items()})
    proxy.autocast = _Fp32Autocast  # type: ignore[attr-defined]
    done = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy  # type: ignore[attr-defined]
            done.append(name)
    return _applied([replace(AUTOCAST, target=f"{m}.torch.autocast") for m in done])


# ----------------------------------------------------------------------------------------------------------------
# CPU_MEMORY: torch.cpu lacks the CUDA memory statistics verl logs


def patch_cpu_memory_stats() -> list[Patch]:
    import torch

    done = []
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved",
                 "reset_peak_memory_stats", "empty_cache", "mem_get_info"):
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, (lambda *a, **k: (0, 0)) if name == "mem_get_info" else (lambda *a, **k: 0))
            done.append(name)
    return _applied([CPU_MEMORY]) if done else []


# ----------------------------------------------------------------------------------------------------------------
# FSDP1_SYNC: FSDP1 refuses sync_module_states with CPU parameters


def patch_fsdp1_sync_module_states() -> list[Patch]:
    try:
        iu = importlib.import_module("torch.distributed.fsdp._init_utils")
    except ImportError:
        return []
    if hasattr(iu, "_check_module_states_for_sync_module_states"):
        iu._check_module_states_for_sync_module_states = lambda *a, **k: None  # type: ignore[attr-defined]
        return _applied([FSDP1_SYNC])
    return []


# ----------------------------------------------------------------------------------------------------------------
# VALUEHEAD_LOADER: verl.utils.model.load_valuehead_model hard-codes flash_attention_2 (0.8/0.9)


def patch_valuehead_loader(attn_implementation: str) -> list[Patch]:
    try:
        um = importlib.import_module("verl.utils.model")
    except ImportError:
        return []
    if not hasattr(um, "load_valuehead_model") or getattr(um.load_valuehead_model, "_stepdiff", False):
        return []
    import inspect

    src = inspect.getsource(um.load_valuehead_model)
    if "flash_attention_2" not in src:
        return []

    def load_valuehead_model(local_path: str, torch_dtype: Any, model_config: Any, trust_remote_code: bool) -> Any:
        from transformers import AutoModelForTokenClassification

        model_config.classifier_dropout = 0.0
        return AutoModelForTokenClassification.from_pretrained(
            pretrained_model_name_or_path=local_path, torch_dtype=torch_dtype, config=model_config,
            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)

    load_valuehead_model._stepdiff = True  # type: ignore[attr-defined]
    um.load_valuehead_model = load_valuehead_model  # type: ignore[attr-defined]
    return _applied([VALUEHEAD_LOADER])


def disable_hardcoded_autocast(modules: list[str]) -> list[Patch]:
    """AUTOCAST only in those of `modules` whose source hard-codes a bf16 autocast."""
    import inspect

    hard = []
    for m in modules:
        try:
            src = inspect.getsource(importlib.import_module(m))
        except (ImportError, OSError, TypeError):
            continue
        if "autocast(" in src and "dtype=torch.bfloat16)" in src:
            hard.append(m)
    return patch_cpu_autocast(hard)
