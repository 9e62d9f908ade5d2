"""OpenRLHF adapter: the spec's SFT steps through OpenRLHF's own `openrlhf.cli.train_sft` entry point.

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
Recorders (read-only wrappers, see `_Recorder`): DeepSpeedEngine._take_model_step (hooks read-out only),
Actor.forward (token ids received), SFTTrainer.save_logs_and_checkpoints (logged loss/grad norm),
SFTDataset.__getitem__ (loss masks), DeepspeedStrategy.backward (losses passed to backward), deepspeed.initialize
(the DeepSpeed config).
Environment: `openrlhf` installed --no-deps, plus the release's own deepspeed and transformers pins and the SFT
path's imports (peft, torchdata, datasets, pylatexenc, sympy, einops); flash-attn from its sdist without kernels.
Not installed: vllm, ray, wandb, bitsandbytes, optimum, liger-kernel, ring-flash-attn.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import runpy
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stepdiff.harness import data as D
from stepdiff.harness.record import Record, RecordMeta, StepRecord
from stepdiff.harness.spec import Spec, doc

from . import openrlhf_support as S
from .base import Adapter, Capabilities, WorkerContext, framework_versions, set_dist_env


@dataclass(frozen=True)
class OpenRLHFKnobs:
    zero_stage: int = doc(2, "--ds.zero_stage: DeepSpeed ZeRO stage 0-3 (OpenRLHF's default 2).", minimum=0)
    adam_offload: bool = doc(False, "--ds.adam_offload: optimizer states and step on the CPU (ZeRO offload, "
                                    "DeepSpeedCPUAdam); with DeepSpeed <= 0.18.9 and grad_accum >= 3 this is the "
                                    "offload accumulation bug's path.")
    overlap_comm: bool = doc(False, "--ds.overlap_comm.")
    readout: Literal["hooks", "adam-delta"] = doc(
        "hooks", "Gradient read-out: 'hooks' = safe_get_full_grad around DeepSpeed's optimizer step; 'adam-delta' = "
                 "black box, the gradient recovered from OpenRLHF's saved per-step checkpoints through the AdamW "
                 "update (needs optimizer.name = adamw, a large eps, betas (0, 0) beyond one step).")
    seed: int = doc(42, "--train.seed: seeds OpenRLHF's sampler shuffle (the data order is compensated for it).")
    adam_impl: Literal["deepspeed", "torch"] = doc(
        "deepspeed", "'deepspeed' = the optimizer OpenRLHF's config makes DeepSpeed build (FusedAdam, DeepSpeedCPUAdam "
                     "with adam_offload; JIT-compiled on CPU, 1-4 min once per environment); 'torch' = DeepSpeed's "
                     "documented optimizer.params.torch_adam = true (+ zero_force_ds_cpu_optimizer = false) added to "
                     "OpenRLHF's DeepSpeed config: torch.optim.AdamW, no compile. Gradients are read before either.")


PATCHES = S.PATCHES
NOT_PPO = ("PPO actor/critic (issue item 7) is not driven yet: OpenRLHF's PPO steps live in openrlhf.trainer.ray "
           "(ActorPPOTrainer.training_step(experience) / CriticPPOTrainer), built inside Ray actors "
           "(PolicyModelActor/CriticModelActor) with experiences from vLLM or HF generation. ActorPPOTrainer is a "
           "plain class, so an injected-Experience drive without starting Ray looks possible, but its module "
           "imports ray, "
           "and it needs the Ray launcher's args tree and a hand-built Experience: not done in this iteration "
           "(loss.kind = policy/value is reported unsupported).",)


class OpenRLHFAdapter(Adapter):
    name = "openrlhf"
    capabilities = Capabilities(
        framework="openrlhf",
        runs="openrlhf.cli.train_sft run in-process (runpy): argparse/hierarchize -> get_strategy -> "
             "DeepspeedStrategy.setup_distributed -> Actor.from_pretrained -> get_tokenizer -> blending_datasets -> "
             "SFTDataset (its text, tokenisation, loss mask) -> setup_dataloader (DistributedSampler) -> "
             "strategy.prepare (deepspeed.initialize, AdamW: FusedAdam / DeepSpeedCPUAdam) -> SFTTrainer.fit "
             "(SFTLoss, its token normalisers, strategy.backward/optimizer_step) -> save_model; dotted (>= 0.10.2) "
             "and flat (<= 0.10.1) CLI spellings",
        readouts=("gradients: safe_get_full_grad of every parameter before DeepSpeedEngine._take_model_step "
                  "(after accumulation and DP reduction, before clipping); params after it",
                  "black box (readout = 'adam-delta'): per-step HF checkpoints, g = u * eps / (lr - |u|) from the "
                  "AdamW update u",
                  "loss: OpenRLHF's logged loss_mean of the step, averaged over DP ranks",
                  "grad norm: OpenRLHF's logged grad_norm (engine.get_global_grad_norm)",
                  "supervised targets: SFTDataset's loss mask -> meta.extra['supervised_targets']"),
        knobs=("zero_stage", "adam_offload", "overlap_comm", "readout", "seed", "adam_impl"),
        devices=("cpu", "cuda"),
        world_sizes="1, 2, ... (torchrun; gloo on CPU, nccl on CUDA)",
        dtypes=("float32", "bfloat16"),
        optimizers=("adamw",),
        loss_kinds=("sft",),
        patches=PATCHES,
        notes=("OpenRLHF builds only AdamW (or Muon) through DeepSpeed: optimizer.name = sgd is unsupported; "
               "weight decay is unsupported (OpenRLHF exempts norm weights from decay, the spec's AdamW does not).",
               "Every sample's response must end with EOS (OpenRLHF appends one otherwise).",
               "First run per DeepSpeed version JIT-compiles DeepSpeed's CPU Adam ops (1-4 min, cached in the "
               "environment's torch_extensions).",
               *NOT_PPO),
    )

    # The conformance kit's knobs: torch AdamW through DeepSpeed's torch_adam switch (no JIT compile). The kit's
    # spec must also use optimizer.name = "adamw" (OpenRLHF has no SGD), e.g. lr = eps = 1 so the update ~ -g.
    conformance_knobs = {"adam_impl": "torch"}
    conformance_optimizer = {"name": "adamw", "lr": 1.0, "eps": 1.0}

    # ---------------------------------------------------------------------------------------------------------
    # Environment

    @classmethod
    def requirements(cls, version: str | None) -> list[str]:
        ds, tf, _ = S.release_pins(version)
        extra = ["ray"] if S.imports_ray_on_sft_path(version) else []
        return [f"deepspeed=={ds}" if ds else "deepspeed", f"transformers=={tf}" if tf else "transformers",
                *S.SFT_PATH_PACKAGES, *extra]

    @classmethod
    def install_steps(cls, version: str | None) -> list[list[str]]:
        _, _, fa = S.release_pins(version)
        return [["--no-deps", f"openrlhf=={version}" if version else "openrlhf"],
                ["--no-deps", "--no-build-isolation", f"flash-attn=={fa}"]]

    @classmethod
    def build_env(cls, version: str | None) -> dict[str, str]:
        return {"DS_BUILD_OPS": "0", "FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE", "FLASH_ATTENTION_FORCE_BUILD": "TRUE"}

    # ---------------------------------------------------------------------------------------------------------
    # What the CLI can express

    @classmethod
    def unsupported(cls, spec: Spec, version: str | None = None) -> str | None:
        reason = super().unsupported(spec, version)
        if reason:
            return reason
        k: OpenRLHFKnobs = spec.knobs_for(cls.name)
        o, d = spec.optimizer, spec.data
        if k.zero_stage > 3:
            return f"openrlhf.zero_stage = {k.zero_stage}: DeepSpeed has stages 0-3"
        if k.adam_offload and k.zero_stage == 0:
            return "openrlhf.adam_offload needs zero_stage >= 1 (DeepSpeed offloads ZeRO optimizer states)"
        if o.weight_decay > 0:
            return ("optimizer.weight_decay > 0: OpenRLHF exempts norm weights from decay "
                    "(get_optimizer_grouped_parameters), the spec's AdamW decays every parameter")
        if d.supervise != "response":
            return "data.supervise = 'all': OpenRLHF's SFT supervises the response and EOS only"
        if len({d.pad_id, d.eos_id, d.bos_id}) < 3:
            return "data.pad_id, eos_id and bos_id must differ (they are distinct tokenizer tokens)"
        for i, s in enumerate(D.samples(spec)):
            if not s.response or s.response[-1] != d.eos_id:
                return (f"data.samples[{i}]: the response does not end with EOS; OpenRLHF's SFTDataset appends EOS "
                        "to every sample")
            if not s.prompt:
                return f"data.samples[{i}]: empty prompt (OpenRLHF's loss mask starts at the last prompt token)"
        if k.readout == "adam-delta":
            if o.clip_grad_norm > 0:
                return "openrlhf.readout = 'adam-delta' needs optimizer.clip_grad_norm = 0 (the update is clipped)"
            if spec.batch.steps > 1 and tuple(o.betas) != (0.0, 0.0):
                return ("openrlhf.readout = 'adam-delta' beyond one step needs optimizer.betas = [0, 0] (the update "
                        "then depends on the current gradient only)")
            if o.lr <= 0 or o.eps <= 0:
                return "openrlhf.readout = 'adam-delta' needs optimizer.lr > 0 and optimizer.eps > 0"
        return None

    # ---------------------------------------------------------------------------------------------------------
    # Worker

    def setup(self, ctx: WorkerContext) -> None:
        if ctx.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        set_dist_env(ctx)
        S.env_for_run(ctx.scratch)
        ctx.state["torch_extensions"] = os.environ.get("TORCH_EXTENSIONS_DIR")
        ctx.state["patches"] = S.apply_cpu_patches(ctx.device)
        ctx.state["runs"] = 0

    def run(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Record:
        import torch

        t0 = time.perf_counter()
        from importlib import metadata

        version = metadata.version("openrlhf")
        b = spec.batch
        if ctx.world_size != b.world_size:
            raise RuntimeError(f"worker world size {ctx.world_size} != batch.world_size {b.world_size}")
        k: OpenRLHFKnobs = spec.knobs_for(self.name)
        ctx.state["runs"] += 1
        run_dir = ctx.scratch / f"run-{ctx.state['runs']}"
        shutil.rmtree(run_dir, ignore_errors=True)
        model_dir, data_path = run_dir / "model", run_dir / "train.jsonl"
        S.write_model_dir(spec, init_path, model_dir)
        rows = S.sampler_order(spec, k.seed)
        S.write_dataset(spec, rows, data_path)

        o = spec.optimizer
        dtype = {"float32": "fp32", "bfloat16": "bf16"}[spec.model.dtype]
        want: dict[str, Any] = {
            "model": str(model_dir), "dataset": str(data_path), "input_key": "input", "output_key": "output",
            "input_template": "{} ", "max_len": 4 * spec.model.max_position_embeddings,
            "micro_batch": b.micro_batch_size, "batch": spec.samples_per_step, "epochs": 1, "seed": k.seed,
            "zero_stage": k.zero_stage, "adam_offload": k.adam_offload, "overlap_comm": k.overlap_comm,
            "dtype": dtype, "attn": spec.model.attn_implementation,
            "lr": repr(o.lr), "betas": (repr(o.betas[0]), repr(o.betas[1])), "weight_decay": 0.0,
            "scheduler": "constant", "warmup": 0.0, "max_norm": repr(float(o.clip_grad_norm)),
            "output_dir": str(run_dir / "out"), "ckpt_path": str(run_dir / "ckpt"), "eval_split": "train",
        }
        eps_note = None
        if o.eps != 1e-8 or k.readout == "adam-delta":
            want["eps"] = repr(o.eps)
        else:
            eps_note = "eps"  # 1e-8 is also the default of releases without --adam.eps (FusedAdam / DeepSpeedCPUAdam)
        if k.readout == "adam-delta":
            want.update({"save_steps": 1, "save_hf": True, "disable_ds_ckpt": True})
        if dtype == "fp32":
            S.patch_fp32_dtype()
        applied = list(ctx.state["patches"]) + [S.PATCHES[6].target] + (
            [S.PATCHES[7].target] if dtype == "fp32" else [])

        rec = _Recorder(spec, k.readout == "hooks", torch_adam=k.adam_impl == "torch")

        seen: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            for cm in rec.hooks():
                stack.enter_context(cm)
            stack.enter_context(S.cli_arguments(want, seen))
            saved_argv = sys.argv
            sys.argv = ["openrlhf.cli.train_sft"]
            try:
                if dtype == "fp32":
                    _import_and_patch_fp32()
                runpy.run_module("openrlhf.cli.train_sft", run_name="__main__", alter_sys=False)
            finally:
                sys.argv = saved_argv
        fit_s = time.perf_counter() - t0
        warnings = []
        if k.adam_impl == "torch":
            if rec.optimizer_from_config:
                applied.append(S.PATCHES[8].target)
            else:  # releases <= 0.10.1 build FusedAdam / DeepSpeedCPUAdam themselves (strategy.create_optimizer)
                warnings.append("adam_impl = 'torch' not applied: this release builds its optimizer itself "
                                "(strategy.create_optimizer), not from the DeepSpeed config")

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
        steps = []
        for s in range(b.steps):
            grads = {n: grads_per_step[s][n] for n in names}
            params = {n: params_per_step[s][n] for n in names}
            steps.append(StepRecord(loss=losses[s], grad_norm=norms[s], grads=grads, params=params))
        extra: dict[str, Any] = {
            "cli_argv": seen.get("argv"), "cli_dialect": seen.get("dialect"),
            "dataset_rows": rows, "loss_source": loss_source,
            "supervised_targets": targets, "ds_config": rec.ds_config,
            "logged": rec.logs, "backward_losses": rec.backward_losses,
            "engine_grad_norms": [st.get("engine_norm") for st in rec.steps],
            "eps_from_release_default": eps_note is not None,
            "torch_extensions_dir": ctx.state.get("torch_extensions"),
            "optimizer_from_ds_config": rec.optimizer_from_config,
        }
        if torch.distributed.is_initialized() and ctx.world_size > 1:
            torch.distributed.barrier()
        meta = RecordMeta(
            adapter=self.name, framework_version=version, code_path=self.capabilities.runs,
            readout=self.capabilities.readouts[0 if k.readout == "hooks" else 1], device=ctx.device,
            world_size=ctx.world_size, dtype=spec.model.dtype,
            versions=framework_versions("openrlhf", "deepspeed", "flash-attn", "datasets", "peft"),
            timings={"run_s": time.perf_counter() - t0, "cli_s": fit_s}, patches=applied, extra=extra,
            warnings=warnings,
        )
        return Record(meta=meta, steps=steps)


def _import_and_patch_fp32() -> None:
    """Import the CLI's modules first so every module that imported convert_to_torch_dtype gets the fp32 case."""
    import importlib

    importlib.import_module("openrlhf.cli.train_sft")
    S.patch_fp32_dtype()
    sys.modules.pop("openrlhf.cli.train_sft", None)  # runpy executes it afresh as __main__


class _Recorder:
    """Copies of what OpenRLHF and DeepSpeed hold during one CLI run (nothing is written back)."""

    def __init__(self, spec: Spec, grad_hooks: bool, torch_adam: bool = False) -> None:
        self.spec = spec
        self.grad_hooks = grad_hooks
        self.torch_adam = torch_adam
        self.ds_config: Any = None
        self.optimizer_from_config: bool | None = None
        self.steps: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.backward_losses: list[float] = []
        self.forward_rows: list[list[list[int]]] = []
        self.items: dict[int, tuple[list[int], list[float]]] = {}
        self.label_rows: list[list[list[int]]] = []

    def hooks(self) -> list[Any]:
        import importlib

        from deepspeed.runtime.engine import DeepSpeedEngine

        actor_mod = importlib.import_module("openrlhf.models.actor")
        trainer_mod = importlib.import_module("openrlhf.trainer.sft_trainer")
        ds_mod = importlib.import_module("openrlhf.datasets.sft_dataset")
        strategy_mod = importlib.import_module("openrlhf.utils.deepspeed.deepspeed")
        rec = self
        out = []

        def take_step(original: Any) -> Any:
            def wrapper(engine: Any, *a: Any, **kw: Any) -> Any:
                grads = S.full_grads(engine)
                result = original(engine, *a, **kw)
                norm = engine.get_global_grad_norm()
                rec.steps.append({"grads": grads, "params": S.full_params(engine),
                                  "engine_norm": None if norm is None else float(norm)})
                return result
            return wrapper

        if self.grad_hooks:
            out.append(S.wrapped(DeepSpeedEngine, "_take_model_step", take_step))

        def forward(original: Any) -> Any:
            def wrapper(actor: Any, sequences: Any, *a: Any, **kw: Any) -> Any:
                import torch

                if actor.training and torch.is_grad_enabled():
                    mask = kw.get("attention_mask")
                    if mask is None and len(a) >= 2:
                        mask = a[1]
                    rows = []
                    for i in range(sequences.shape[0]):
                        ids = sequences[i] if mask is None else sequences[i][mask[i].bool()]
                        rows.append([int(x) for x in ids.tolist()])
                    rec.forward_rows.append(rows)
                return original(actor, sequences, *a, **kw)
            return wrapper

        out.append(S.wrapped(actor_mod.Actor, "forward", forward))

        def save_logs(original: Any) -> Any:
            def wrapper(trainer: Any, *a: Any, **kw: Any) -> Any:
                logs = kw.get("logs_dict", a[3] if len(a) > 3 else None)
                rec.logs.append({k: _plain(v) for k, v in dict(logs or {}).items()})
                return original(trainer, *a, **kw)
            return wrapper

        out.append(S.wrapped(trainer_mod.SFTTrainer, "save_logs_and_checkpoints", save_logs))

        def getitem(original: Any) -> Any:
            def wrapper(dataset: Any, idx: int) -> Any:
                item = original(dataset, idx)
                # (input_ids, attention_mask, loss_mask) from 0.7.0 on; older releases return (prompt_len, ids, mask,
                # info) and build the labels in the trainer (read from GPTLMLoss below)
                if isinstance(item, tuple) and len(item) == 3 and getattr(item[2], "shape", None) == item[0].shape:
                    ids, loss_mask = item[0], item[2]
                    rec.items[int(idx)] = ([int(x) for x in ids[0].tolist()],
                                           [float(x) for x in loss_mask[0].tolist()])
                return item
            return wrapper

        loss_cls = getattr(importlib.import_module("openrlhf.models"), "GPTLMLoss", None)
        if loss_cls is not None:
            def gpt_loss(original: Any) -> Any:
                def wrapper(module: Any, logits: Any, labels: Any, *a: Any, **kw: Any) -> Any:
                    import torch

                    if torch.is_grad_enabled():  # training micro-steps, not the evaluation
                        ignore = getattr(module, "IGNORE_INDEX", -100)
                        rec.label_rows.append([[t for t in range(1, row.shape[0]) if int(row[t]) != ignore]
                                               for row in labels])
                    return original(module, logits, labels, *a, **kw)
                return wrapper

            out.append(S.wrapped(loss_cls, "forward", gpt_loss))

        out.append(S.wrapped(ds_mod.SFTDataset, "__getitem__", getitem))

        def backward(original: Any) -> Any:
            def wrapper(strategy: Any, loss: Any, *a: Any, **kw: Any) -> Any:
                rec.backward_losses.append(float(loss.detach().float()))
                return original(strategy, loss, *a, **kw)
            return wrapper

        out.append(S.wrapped(strategy_mod.DeepspeedStrategy, "backward", backward))

        import deepspeed

        def initialize(original: Any) -> Any:
            def wrapper(*a: Any, **kw: Any) -> Any:
                cfg = kw.get("config")
                training = kw.get("optimizer") is not None or (isinstance(cfg, dict) and "optimizer" in cfg)
                if isinstance(cfg, dict) and training and rec.ds_config is None:  # the training engine
                    rec.optimizer_from_config = "optimizer" in cfg
                    if rec.torch_adam and "optimizer" in cfg:
                        cfg = {**cfg, "zero_force_ds_cpu_optimizer": False,
                               "optimizer": {**cfg["optimizer"],
                                             "params": {**cfg["optimizer"].get("params", {}), "torch_adam": True}}}
                        kw["config"] = cfg
                    rec.ds_config = json.loads(json.dumps(cfg, default=str))
                return original(*a, **kw)
            return wrapper

        out.append(S.wrapped(deepspeed, "initialize", initialize))
        return out

    def check_placement(self, rank: int) -> None:
        """Each micro-batch OpenRLHF's model received on this rank must be the spec's, in order."""
        spec, b = self.spec, self.spec.batch
        smp = D.samples(spec)
        expected = [[[*smp[i].prompt, *smp[i].response] for i in D.micro_batch_indices(spec, s, rank, m)]
                    for s in range(b.steps) for m in range(b.grad_accum)]
        got = [sorted(x) for x in self.forward_rows]
        if len(self.forward_rows) != len(expected):
            raise RuntimeError(f"rank {rank}: OpenRLHF ran {len(self.forward_rows)} training forwards, the spec has "
                               f"{len(expected)} micro-batches")
        for k, (g, e) in enumerate(zip(got, expected, strict=True)):
            if g != sorted(e):
                raise RuntimeError(f"rank {rank}: micro-batch {k} OpenRLHF received is not the spec's (data order or "
                                   f"tokenisation differs): got {g[:1]}..., expected {e[:1]}...")

    def supervised_targets(self, rows: list[int], rank: int) -> dict[str, list[int]] | None:
        """{sample index: positions t (in prompt+response) whose token is a supervised target}. OpenRLHF's loss
        uses loss_mask[:, :-1] against the log-prob of token t+1, so mask position i supervises token i + 1.
        Releases <= 0.6.x: the labels GPTLMLoss received (call k = this rank's k-th micro-batch, checked order)."""
        out: dict[str, list[int]] = {}
        for idx, (_ids, mask) in sorted(self.items.items()):
            out[str(rows[idx])] = [i + 1 for i, v in enumerate(mask[:-1]) if v > 0]
        if not out and self.label_rows:
            b = self.spec.batch
            for k, batch_rows in enumerate(self.label_rows[: b.steps * b.grad_accum]):
                idx = D.micro_batch_indices(self.spec, k // b.grad_accum, rank, k % b.grad_accum)
                for i, targets in zip(idx, batch_rows, strict=True):
                    out[str(i)] = targets
        return out or None

    def step_scalars(self, ctx: WorkerContext) -> tuple[list[float], list[float | None], str]:
        import torch

        b = self.spec.batch
        per_step = b.grad_accum
        if len(self.logs) >= b.steps and all("loss_mean" in lg for lg in self.logs[: b.steps]):
            local = [float(lg["loss_mean"]) for lg in self.logs[: b.steps]]
            source = "logged loss_mean, averaged over DP ranks"
        elif len(self.backward_losses) >= b.steps * per_step:
            bl = self.backward_losses
            local = [sum(bl[s * per_step:(s + 1) * per_step]) / per_step for s in range(b.steps)]
            source = "mean of the losses passed to strategy.backward, over micro-steps and DP ranks"
        else:
            local = [math.nan] * b.steps
            source = "none captured"
        t = torch.tensor(local, dtype=torch.float64)
        if torch.distributed.is_initialized() and ctx.world_size > 1:
            torch.distributed.all_reduce(t)
            t /= ctx.world_size
        norms: list[float | None] = []
        for s in range(b.steps):
            v = self.logs[s].get("grad_norm") if s < len(self.logs) else None
            if v is None and s < len(self.steps):
                v = self.steps[s].get("engine_norm")
            norms.append(float(v) if v is not None and float(v) > 0 else None)
        return [float(x) for x in t], norms, source


def _plain(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


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
