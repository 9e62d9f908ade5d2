"""OpenRLHF's SFT code path: the spec's steps through OpenRLHF's own `openrlhf.cli.train_sft` entry point.

What runs (in the worker process, every rank, once per spec): `runpy.run_module("openrlhf.cli.train_sft")`, i.e.
OpenRLHF's own argparse -> (`hierarchize`) -> `get_strategy` -> `DeepspeedStrategy.setup_distributed` (DeepSpeed
CPU accelerator + gloo, or CUDA + nccl) -> `Actor` (`from_pretrained` of the spec's tiny Llama, saved to a local
directory) -> `get_tokenizer` (a local word-level tokenizer whose ids are the spec's token ids) -> `blending_datasets`
(local jsonl) -> `SFTDataset` (OpenRLHF's own prompt/response text, tokenisation and loss mask) ->
`setup_dataloader` (its DistributedSampler + StatefulDataLoader) -> `strategy.prepare` (`deepspeed.initialize` with
its AdamW config: FusedAdam, or DeepSpeedCPUAdam with adam_offload) -> `SFTTrainer.fit` (its `SFTLoss` and, from
0.10.3, its token normalisers; `strategy.backward` / `optimizer_step`) -> `strategy.save_model`.
Both CLI spellings are handled: the arguments are built from the installed release's own parser (dotted
`--train.micro_batch_size` from 0.10.2 on, flat `--micro_train_batch_size` up to 0.10.1).

Data placement: the CLI always shuffles (DistributedSampler(shuffle=True, seed=--train.seed)). The jsonl rows are
written in the order that this sampler's permutation maps onto the spec's placement, so rank r receives exactly
`data.micro_batch_indices(spec, step, r, m)` in order; the token ids each rank's model actually receives are
checked against the spec after the run (a mismatch is an error, never a silent pass).

Read-outs (knob `readout`):
- "hooks" (default): `DeepSpeedEngine._take_model_step` is wrapped: before it runs (after accumulation, before
  clipping, which DeepSpeed does inside it), `deepspeed.utils.safe_get_full_grad` of every parameter (ZeRO 0-3,
  offload); after it, the unsharded parameters.
- "adam-delta" (black box, no gradient hooks): OpenRLHF saves a Hugging Face checkpoint every step
  (`--ckpt.save_hf --ckpt.save_steps 1`); with AdamW each step's update is u = lr * g / (|g| + eps) (first step, or
  betas = (0, 0)), so g = u * eps / (lr - |u|), exact; use a large eps (e.g. lr = eps = 1e6, where u ~ g) so the
  inversion is well conditioned.
- loss: OpenRLHF's logged per-step `loss_mean` (captured at `SFTTrainer.save_logs_and_checkpoints`), averaged over
  the DP ranks (OpenRLHF logs rank 0's); where a release logs no `loss_mean`, the mean over micro-steps and ranks of
  the losses it passes to `strategy.backward`. grad norm: its logged `grad_norm` (`engine.get_global_grad_norm()`),
  None where DeepSpeed computes none (ZeRO-0 without clipping).
- supervised targets: `SFTDataset.__getitem__`'s loss mask per sample, in meta.extra['supervised_targets'].

Patches (CPU glue; none touches the loss, the gradients or the optimizer):
- P0 `flash_attn_2_cuda` stub module: flash-attn is installed from its sdist without kernels
  (FLASH_ATTENTION_SKIP_CUDA_BUILD); OpenRLHF imports its pure-torch `bert_padding` at module level.
- P1 `torch.cuda.set_device` no-op, P2 `torch.cuda.current_device` -> 'cpu', P3 `torch.cuda.synchronize` no-op (CPU
  only): OpenRLHF's strategy calls them unconditionally.
- P4 `deepspeed.comm.torch.build_shm_op` no-op (CPU only): skips a g++ JIT of a comm op; gloo is used.
- P5 `DeepSpeedZeroOptimizer.flatten_dense_tensors_aligned` result detached: DeepSpeed 0.18.7-0.18.9 + gloo + torch
  2.13 crash at world size 2 in the optimizer step's all-gather (0.19.0 has the same detach upstream).
- P6 `argparse.ArgumentParser.parse_args` during the CLI run: the argv is built from the parser's option table; for
  fp32, 'fp32' is added to the `--ds.param_dtype` choices (bf16/fp16 only otherwise).
- P7 `openrlhf.utils.utils.convert_to_torch_dtype('fp32')` -> torch.float32 (fp32 runs only).
- P8 (knob adam_impl = 'torch' only) `deepspeed.initialize` during the CLI run: DeepSpeed's documented
  `optimizer.params.torch_adam = true` (+ `zero_force_ds_cpu_optimizer = false`) added to OpenRLHF's config, so
  DeepSpeed builds torch.optim.AdamW instead of JIT-compiling its CPU Adam ops.
- P9 `cpuinfo.get_cpu_info` memoized per worker (CPU and CUDA): py-cpuinfo runs a ~1.1 s subprocess per call and
  DeepSpeedCPUAdam makes three; the CPU and so the answer do not change inside one process.
Recorders (read-only wrappers, see `recorder.Recorder`): DeepSpeedEngine._take_model_step (hooks read-out only),
Actor.forward (token ids received), SFTTrainer.save_logs_and_checkpoints (logged loss/grad norm),
SFTDataset.__getitem__ (loss masks), DeepspeedStrategy.backward (losses passed to backward), deepspeed.initialize
(the DeepSpeed config).
Environment: `openrlhf` installed --no-deps, plus the release's own deepspeed and transformers pins and the SFT
path's imports (peft, torchdata, datasets, pylatexenc, sympy, einops); flash-attn from its sdist without kernels.
Not installed: vllm, ray, wandb, bitsandbytes, optimum, liger-kernel, ring-flash-attn.
"""

from __future__ import annotations

import contextlib
import runpy
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from stepdiff.harness.record import StepRecord
from stepdiff.harness.spec import Spec

from ..base import Driven, WorkerContext
from . import cli_args, cpu, fixture
from .knobs import OpenRLHFKnobs
from .recorder import Recorder

CODE_PATH = ("openrlhf.cli.train_sft run in-process (runpy): argparse/hierarchize -> get_strategy -> "
             "DeepspeedStrategy.setup_distributed -> Actor.from_pretrained -> get_tokenizer -> blending_datasets -> "
             "SFTDataset (its text, tokenisation, loss mask) -> setup_dataloader (DistributedSampler) -> "
             "strategy.prepare (deepspeed.initialize, AdamW: FusedAdam / DeepSpeedCPUAdam) -> SFTTrainer.fit "
             "(SFTLoss, its token normalisers, strategy.backward/optimizer_step) -> save_model; dotted (>= 0.10.2) "
             "and flat (<= 0.10.1) CLI spellings")
READOUTS = ("gradients: safe_get_full_grad of every parameter before DeepSpeedEngine._take_model_step "
            "(after accumulation and DP reduction, before clipping); params after it",
            "black box (readout = 'adam-delta'): per-step HF checkpoints, g = u * eps / (lr - |u|) from the "
            "AdamW update u",
            "loss: OpenRLHF's logged loss_mean of the step, averaged over DP ranks",
            "grad norm: OpenRLHF's logged grad_norm (engine.get_global_grad_norm)",
            "supervised targets: SFTDataset's loss mask -> meta.extra['supervised_targets']")


def cli_request(spec: Spec, k: OpenRLHFKnobs, run_dir: Path, model_dir: Path, data_path: Path) -> dict[str, Any]:
    """What the CLI run must be told (concept -> value; `cli_args.build_argv` spells it for the release)."""
    o, b = spec.optimizer, spec.batch
    want: dict[str, Any] = {
        "model": str(model_dir), "dataset": str(data_path), "input_key": "input", "output_key": "output",
        "input_template": "{} ", "max_len": 4 * spec.model.max_position_embeddings,
        "micro_batch": b.micro_batch_size, "batch": spec.samples_per_step, "epochs": 1, "seed": k.seed,
        "zero_stage": k.zero_stage, "adam_offload": k.adam_offload, "overlap_comm": k.overlap_comm,
        "dtype": {"float32": "fp32", "bfloat16": "bf16"}[spec.model.dtype], "attn": spec.model.attn_implementation,
        "lr": repr(o.lr), "betas": (repr(o.betas[0]), repr(o.betas[1])), "weight_decay": repr(o.weight_decay),
        "scheduler": "constant", "warmup": 0.0, "max_norm": repr(float(o.clip_grad_norm)),
        "output_dir": str(run_dir / "out"), "ckpt_path": str(run_dir / "ckpt"), "eval_split": "train",
    }
    if o.eps != 1e-8 or k.readout == "adam-delta":
        want["eps"] = repr(o.eps)  # 1e-8 is also the default of releases without --adam.eps (FusedAdam/CPUAdam)
    if k.readout == "adam-delta":
        want.update({"save_steps": 1, "save_hf": True, "disable_ds_ckpt": True})
    return want


def run_cli(rec: Recorder, want: dict[str, Any], seen: dict[str, Any]) -> None:
    """`openrlhf.cli.train_sft` as `python -m` runs it, with the recorders installed."""
    with contextlib.ExitStack() as stack:
        for cm in rec.hooks():
            stack.enter_context(cm)
        stack.enter_context(cli_args.cli_arguments(want, seen))
        saved_argv = sys.argv
        sys.argv = ["openrlhf.cli.train_sft"]
        try:
            if want["dtype"] == "fp32":
                cpu.import_and_patch_fp32()
            runpy.run_module("openrlhf.cli.train_sft", run_name="__main__", alter_sys=False)
        finally:
            sys.argv = saved_argv


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, k: OpenRLHFKnobs) -> Driven:
    import torch

    t0 = time.perf_counter()
    from importlib import metadata

    version = metadata.version("openrlhf")
    b, o = spec.batch, spec.optimizer
    ctx.state["runs"] += 1
    run_dir = ctx.scratch / f"run-{ctx.state['runs']}"
    shutil.rmtree(run_dir, ignore_errors=True)
    model_dir, data_path = run_dir / "model", run_dir / "train.jsonl"
    fixture.write_model_dir(spec, init_path, model_dir)
    rows = fixture.sampler_order(spec, k.seed)
    fixture.write_dataset(spec, rows, data_path)
    want = cli_request(spec, k, run_dir, model_dir, data_path)
    fp32 = want["dtype"] == "fp32"
    if fp32:
        cpu.patch_fp32_dtype()
    applied = list(ctx.state["patches"]) + [cpu.CLI_ARGS.target] + ([cpu.FP32_DTYPE.target] if fp32 else [])
    rec = Recorder(spec, k.readout == "hooks", torch_adam=k.adam_impl == "torch")
    seen: dict[str, Any] = {}
    run_cli(rec, want, seen)
    fit_s = time.perf_counter() - t0
    if k.adam_impl == "torch":  # (a release that builds its own optimizer raised Unsupported in the recorder)
        applied.append(cpu.TORCH_ADAM.target)

    rec.check_placement(ctx.rank)
    init = _load_safetensors(init_path)
    names = list(init)
    if k.readout == "hooks":
        if len(rec.steps) != b.steps:
            raise RuntimeError(f"OpenRLHF took {len(rec.steps)} optimizer steps, the spec asked for {b.steps}")
        grads_per_step = [st["grads"] for st in rec.steps]
        params_per_step = [st["params"] for st in rec.steps]
    else:
        params_per_step = []
        for s in range(b.steps):
            ck = _find_hf_checkpoint(run_dir / "ckpt", s + 1)
            params_per_step.append({n: t.float() for n, t in _load_safetensors_dir(ck).items() if n in init})
        grads_per_step = []
        before = init
        for after in params_per_step:
            grads_per_step.append({n: _invert_adam(before[n].float(), after[n], o.lr, o.eps) for n in names})
            before = after
    losses, norms, loss_source = rec.step_scalars(ctx)
    targets = rec.supervised_targets(rows, ctx.rank)
    if torch.distributed.is_initialized() and ctx.world_size > 1:
        gathered: list[Any] = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, targets)
        merged = {key: v for part in gathered if part for key, v in part.items()}
        targets = dict(sorted(merged.items(), key=lambda kv: int(kv[0]))) or None
    hooked = k.readout == "hooks" and len(rec.steps) == b.steps
    steps = [StepRecord(loss=losses[s], grad_norm=norms[s], grads={n: grads_per_step[s][n] for n in names},
                        params={n: params_per_step[s][n] for n in names},
                        state=rec.steps[s].get("state", {}) if hooked else {},
                        opt_step=rec.steps[s].get("opt_step") if hooked else None) for s in range(b.steps)]
    extra: dict[str, Any] = {
        "cli_argv": seen.get("argv"), "cli_dialect": seen.get("dialect"),
        "dataset_rows": rows, "loss_source": loss_source,
        "supervised_targets": targets, "ds_config": rec.ds_config,
        "logged": rec.logs, "backward_losses": rec.backward_losses,
        "engine_grad_norms": [st.get("engine_norm") for st in rec.steps],
        "eps_from_release_default": "eps" not in want,
        "torch_extensions_dir": ctx.state.get("torch_extensions"),
        "optimizer_from_ds_config": rec.optimizer_from_config,
    }
    if torch.distributed.is_initialized() and ctx.world_size > 1:
        torch.distributed.barrier()
    return Driven(steps=steps, framework_version=version, code_path=CODE_PATH,
                  readout=READOUTS[0 if k.readout == "hooks" else 1], patches=applied,
                  extra=extra, timings={"cli_s": fit_s}, optimizer=rec.optimizer,
                  sources={"state": "framework" if any(st.state for st in steps) else "none"})


def _invert_adam(before: Any, after: Any, lr: float, eps: float) -> Any:
    """The gradient of an AdamW step from its update u = before - after = lr * g / (|g| + eps) (bias-corrected first
    step, or betas (0, 0)): g = u * eps / (lr - |u|)."""
    u = (before.double() - after.double())
    return (u * eps / (lr - u.abs())).float()


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _load_safetensors_dir(d: Path) -> dict[str, Any]:
    out = {}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"no safetensors checkpoint in {d}")
    for f in files:
        out.update(_load_safetensors(f))
    return out


def _find_hf_checkpoint(ckpt_root: Path, global_step: int) -> Path:
    d = ckpt_root / f"global_step{global_step}_hf"
    if d.is_dir():
        return d
    found = sorted(ckpt_root.glob(f"**/*global_step{global_step}*_hf"))
    if not found:
        raise RuntimeError(f"OpenRLHF saved no Hugging Face checkpoint for step {global_step} under {ckpt_root}")
    return found[0]
