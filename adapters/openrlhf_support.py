"""Helpers of the OpenRLHF adapter (stepdiff.adapters.openrlhf): environment pins, the CPU patches, the fixture
(tiny model directory, word-level tokenizer, jsonl data ordered for OpenRLHF's sampler), the CLI argument builder
for both spellings (dotted and flat) and the read-out recorders.

Nothing here re-implements OpenRLHF's math: the fixture only writes files OpenRLHF loads itself, the patches are CPU
glue listed in `PATCHES`, and the recorders copy tensors OpenRLHF/DeepSpeed already hold.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from . import deepspeed_cpu
from .base import Patch
from .deepspeed_cpu import DETACH_PATCH, SHM_PATCH

# ----------------------------------------------------------------------------------------------------------------
# Environments

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
    if version is None:
        return False
    try:
        parts = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return True
    return parts < (0, 10)


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


# ----------------------------------------------------------------------------------------------------------------
# Patches (each one is CPU glue; none is on the loss/gradient path)

PATCHES = (
    Patch("sys.modules['flash_attn_2_cuda']", "a stub module whose attributes raise AttributeError",
          "flash_attn/__init__ imports its CUDA extension; OpenRLHF imports flash_attn.bert_padding (pure torch) at "
          "module level. flash-attn is installed from its sdist without kernels; no kernel is ever called"),
    Patch("torch.cuda.set_device", "no-op on CPU",
          "DeepspeedStrategy.setup_distributed calls torch.cuda.set_device(LOCAL_RANK) unconditionally"),
    Patch("torch.cuda.current_device", "returns 'cpu' on CPU",
          "strategy.all_reduce moves the progress-bar logs to torch.cuda.current_device() every micro-step"),
    Patch("torch.cuda.synchronize", "no-op on CPU",
          "torch_dist_barrier_and_cuda_sync (save_model / save_ckpt) synchronises CUDA after its barrier"),
    SHM_PATCH,
    DETACH_PATCH,
    Patch("argparse.ArgumentParser.parse_args (during the train_sft CLI only)",
          "the CLI's arguments are built from the parser's own option table (dotted or flat spelling); for fp32, "
          "'fp32' is added to the choices of --ds.param_dtype/--param_dtype",
          "OpenRLHF's CLI offers only bf16/fp16; fp32 is DeepSpeed's plain fp32 path (bf16/fp16 disabled)"),
    Patch("openrlhf.utils.utils.convert_to_torch_dtype (and the names imported from it)",
          "'fp32' -> torch.float32 (bf16/fp16 unchanged)",
          "only reached with model.dtype = float32; loads the model in fp32 instead of raising"),
    Patch("deepspeed.initialize (during the CLI run, knob adam_impl = 'torch' only)",
          "adds optimizer.params.torch_adam = true and zero_force_ds_cpu_optimizer = false to OpenRLHF's config",
          "DeepSpeed's own documented switch to torch.optim.AdamW instead of its JIT-compiled CPU Adam ops (saves a "
          "1-4 min compile per environment); the gradients are read before the optimizer runs"),
)


def patch_target_names() -> list[str]:
    return [p.target for p in PATCHES]


def install_flash_attn_stub() -> None:
    """flash_attn/__init__ imports flash_attn_2_cuda (the CUDA kernels), absent without a CUDA build."""
    if "flash_attn_2_cuda" in sys.modules:
        return
    try:
        importlib.import_module("flash_attn_2_cuda")
        return
    except ImportError:
        pass
    stub = types.ModuleType("flash_attn_2_cuda")

    def __getattr__(name: str) -> Any:  # noqa: N807
        # AttributeError (not RuntimeError): hasattr()/inspect probe modules for __file__ and the like
        raise AttributeError(f"flash_attn_2_cuda.{name}: flash-attn CUDA kernels are not built in this environment")

    stub.__getattr__ = __getattr__  # type: ignore[attr-defined,method-assign]
    sys.modules["flash_attn_2_cuda"] = stub


def apply_cpu_patches(device: str) -> list[str]:
    """The process-wide patches (P1-P6). Returns the targets actually patched."""
    import torch

    applied = []
    install_flash_attn_stub()
    applied.append(PATCHES[0].target)
    if device == "cpu":
        torch.cuda.set_device = lambda *a, **k: None
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
        torch.cuda.synchronize = lambda *a, **k: None
        applied += [PATCHES[1].target, PATCHES[2].target, PATCHES[3].target]
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


# ----------------------------------------------------------------------------------------------------------------
# The fixture: model directory, tokenizer, data


def token_names(spec: Spec) -> list[str]:
    d = spec.data
    names = [f"t{i}" for i in range(spec.model.vocab_size)]
    names[d.pad_id], names[d.eos_id], names[d.bos_id] = "<pad>", "<eos>", "<bos>"
    return names


def write_model_dir(spec: Spec, init_path: Path, out: Path) -> None:
    """The spec's tiny Llama (shared initial weights) and a word-level tokenizer whose ids are the token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    from .base import build_model

    out.mkdir(parents=True, exist_ok=True)
    model = build_model(spec, init_path, "float32")  # saved fp32; OpenRLHF casts to its param_dtype when loading
    model.config.eos_token_id = spec.data.eos_id
    model.config.bos_token_id = spec.data.bos_id
    model.config.pad_token_id = spec.data.pad_id
    model.save_pretrained(str(out), safe_serialization=True)
    names = token_names(spec)
    tok = Tokenizer(WordLevel({n: i for i, n in enumerate(names)}, unk_token="<bos>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
                                   unk_token="<bos>")
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # not the model type's tokenizer class
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=1))


def sample_text(spec: Spec, sample: D.Sample) -> tuple[str, str]:
    """(input, output) strings that OpenRLHF's template '{} ' and whitespace tokenizer turn back into the ids."""
    names = token_names(spec)
    return " ".join(names[t] for t in sample.prompt), " ".join(names[t] for t in sample.response)


def sampler_order(spec: Spec, seed: int) -> list[int]:
    """Dataset rows such that OpenRLHF's DistributedSampler (shuffle=True, seed, epoch 0; rank r takes every
    world_size-th index of the permutation) hands rank r exactly data.rank_indices(spec, r), in order.

    rows[i] is the spec sample index written at dataset row i. The adapter verifies at run time (from the token
    ids OpenRLHF's model actually receives) that each rank saw the spec's micro-batches in order."""
    import torch

    b = spec.batch
    per_rank = [D.rank_indices(spec, r) for r in range(b.world_size)]
    n = len(per_rank[0]) * b.world_size
    wanted = [per_rank[k % b.world_size][k // b.world_size] for k in range(n)]  # sampler position k -> sample
    g = torch.Generator()
    g.manual_seed(seed)  # DistributedSampler: seed + epoch, epoch 0
    perm = torch.randperm(n, generator=g).tolist()
    rows = [-1] * n
    for k, row in enumerate(perm):
        rows[row] = wanted[k]
    return rows


def write_dataset(spec: Spec, rows: list[int], path: Path) -> None:
    smp = D.samples(spec)
    with open(path, "w") as f:
        for i in rows:
            inp, outp = sample_text(spec, smp[i])
            f.write(json.dumps({"input": inp, "output": outp}) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# CLI arguments, in whichever spelling the installed release's parser defines

# concept -> candidate option strings, newest spelling first
FLAGS: dict[str, tuple[str, ...]] = {
    "model": ("--model.model_name_or_path", "--pretrain"),
    "dataset": ("--data.dataset", "--dataset"),
    "input_key": ("--data.input_key", "--input_key"),
    "output_key": ("--data.output_key", "--output_key"),
    "input_template": ("--data.input_template", "--input_template"),
    "max_len": ("--data.max_len", "--max_len"),
    "micro_batch": ("--train.micro_batch_size", "--micro_train_batch_size"),
    "batch": ("--train.batch_size", "--train_batch_size"),
    "epochs": ("--train.max_epochs", "--max_epochs"),
    "seed": ("--train.seed", "--seed"),
    "zero_stage": ("--ds.zero_stage", "--zero_stage"),
    "adam_offload": ("--ds.adam_offload", "--adam_offload"),
    "param_dtype": ("--ds.param_dtype", "--param_dtype"),
    "bf16_flag": ("--bf16",),
    "attn": ("--ds.attn_implementation", "--attn_implementation"),
    "flash_attn_flag": ("--flash_attn",),
    "overlap_comm": ("--ds.overlap_comm", "--overlap_comm"),
    "lr": ("--adam.lr", "--learning_rate"),
    "betas": ("--adam.betas", "--adam_betas"),
    "eps": ("--adam.eps",),
    "weight_decay": ("--adam.weight_decay", "--l2"),
    "optim": ("--optim",),
    "scheduler": ("--lr_scheduler",),
    "warmup": ("--lr_warmup_ratio",),
    "max_norm": ("--max_norm",),
    "output_dir": ("--ckpt.output_dir", "--save_path"),
    "ckpt_path": ("--ckpt.path", "--ckpt_path"),
    "save_steps": ("--ckpt.save_steps", "--save_steps"),
    "save_hf": ("--ckpt.save_hf", "--save_hf_ckpt"),
    "disable_ds_ckpt": ("--ckpt.disable_ds", "--disable_ds_ckpt"),
    "num_workers": ("--data.dataloader_num_workers", "--dataloader_num_workers"),
    # releases <= 0.6.x always build an eval set from the same file (split 'test' by default, absent in a jsonl):
    # point it at the train split; it is evaluated after the optimizer step, under no_grad, and never trained on
    "eval_split": ("--eval_split",),
}
OPTIONAL = {"eval_split"}  # passed only where the release's parser defines the option


class CliError(RuntimeError):
    """The installed release's CLI cannot express a spec field (reported as the run's error)."""


def find_flag(options: dict[str, Any], concept: str) -> str | None:
    return next((f for f in FLAGS[concept] if f in options), None)


def build_argv(parser: Any, want: dict[str, Any]) -> tuple[list[str], str]:
    """argv for `parser` (OpenRLHF's train_sft parser) from concept -> value. Returns (argv, dialect).

    Values: None = leave the CLI default, True = a store_true flag, a tuple = several values."""
    options = parser._option_string_actions
    dialect = "dotted" if "--train.micro_batch_size" in options else "flat"
    argv: list[str] = []
    for concept, value in want.items():
        if value is None:
            continue
        if concept == "dtype":
            flag = find_flag(options, "param_dtype")
            if flag is not None:
                action = options[flag]
                if action.choices is not None and value not in action.choices:
                    action.choices = [*action.choices, value]  # fp32 (see PATCHES)
                argv += [flag, value]
            elif find_flag(options, "bf16_flag") is not None:
                if value == "bf16":
                    argv.append("--bf16")
            elif value != "bf16":
                raise CliError(f"this OpenRLHF CLI has no dtype option; cannot run model.dtype={value}")
            continue
        if concept == "attn":
            flag = find_flag(options, "attn")
            if flag is not None:
                argv += [flag, value]
            elif value != "eager":  # older releases: eager unless --flash_attn is given (never given here)
                raise CliError(f"this OpenRLHF CLI has no attention option; it runs eager, not {value}")
            continue
        flag = find_flag(options, concept)
        if flag is None and concept in OPTIONAL:
            continue
        if flag is None:
            raise CliError(f"this OpenRLHF CLI has no option for {concept} ({' / '.join(FLAGS[concept])})")
        if value is True:
            argv.append(flag)
        elif value is False:
            continue
        elif isinstance(value, (tuple, list)):
            argv += [flag, *[str(v) for v in value]]
        else:
            argv += [flag, str(value)]
    return argv, dialect


@contextlib.contextmanager
def cli_arguments(want: dict[str, Any], seen: dict[str, Any]) -> Iterator[None]:
    """During the CLI run, parse_args() parses arguments built from the parser's own option table."""
    import argparse

    original = argparse.ArgumentParser.parse_args

    def parse_args(self: Any, args: Any = None, namespace: Any = None) -> Any:
        if "argv" in seen:  # only the train_sft parser (the first parse) is rewritten
            return original(self, args, namespace)
        argv, dialect = build_argv(self, want)
        seen["argv"], seen["dialect"] = argv, dialect
        return original(self, argv, namespace)

    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------------------------
# Read-out recorders (copies of what OpenRLHF / DeepSpeed hold; nothing is written back)


@contextlib.contextmanager
def wrapped(owner: Any, attr: str, make: Any) -> Iterator[None]:
    """Temporarily replace owner.attr by make(original)."""
    original = owner.__dict__[attr] if attr in owner.__dict__ else getattr(owner, attr)
    setattr(owner, attr, make(original))
    try:
        yield
    finally:
        setattr(owner, attr, original)


def full_params(engine: Any) -> dict[str, Any]:
    """Unsharded fp32 copies of the engine's parameters (ZeRO-3 gathers them; every rank must call)."""
    import deepspeed

    params = list(engine.module.named_parameters())
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in params}
    return {n: p.detach().float().cpu().clone() for n, p in params}


def full_grads(engine: Any) -> dict[str, Any]:
    """Accumulated, DP-reduced, pre-clip gradients (safe_get_full_grad; every rank must call)."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        if g is None:
            g = p.grad
        if g is None:
            raise RuntimeError(f"no gradient for {name} before the optimizer step")
        out[name] = g.detach().float().cpu().clone()
    return out


def env_for_run(scratch: Path) -> None:
    """Caches of datasets/HF go to the worker's scratch, never the user's home."""
    os.environ.setdefault("HF_HOME", str(scratch / "hf_home"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(scratch / "hf_home" / "datasets"))
    os.environ.setdefault("WANDB_MODE", "disabled")
