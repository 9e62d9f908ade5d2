"""verl adapter: the spec's steps through verl's own training code (engine workers, legacy actor, legacy SFT trainer).

What runs (knob `path` x `impl`; impl = "auto", the default, is the release's own default: the legacy SFT trainer
while verl ships it (<= 0.6.x), the legacy actor while `use_legacy_worker_impl=auto` picks it (<= 0.7.x), the engine
otherwise; the critic is always the engine):
- sft / engine (verl >= 0.7): `verl.workers.engine_workers.TrainingWorker` (built in-process, no Ray) with
  `verl.workers.utils.losses.sft_loss`, `.train_batch(td)` per optimizer step: exactly what
  `verl/trainer/sft_trainer.py` does (FSDPEngineWithLMHead.forward_backward_batch + optimizer_step). Data in the
  `MultiTurnSFTDataset` no-padding layout (nested input_ids / position_ids / loss_mask, loss_mask 1 on supervised
  tokens; sft_loss rolls it by -1 itself).
- sft / legacy (verl <= 0.6): `verl.trainer.fsdp_sft_trainer.FSDPSFTTrainer.training_step(batch)` on a trainer made
  with `object.__new__` (its __init__ builds a tokenizer, datasets and a hub model) and the attributes
  training_step reads: config (micro_batch_size_per_gpu, balance_dp_token=False, strategy, clip_grad), the model
  wrapped by verl's own `apply_fsdp2` / FSDP1, verl's `build_optimizer`-equivalent torch optimizer, a constant
  LambdaLR. The loss_mask is given in the convention the release's loss code slices (<= 0.5: `[:, :-1]`,
  prediction positions; >= 0.6: `[:, 1:]`, token membership), read from its source.
- actor / engine (verl >= 0.7): `TrainingWorker.train_mini_batch(td)` with `ppo_loss` (`FSDPActorConfig`), data as
  `ray_trainer._update_actor` builds it: left/right-padded PPO tensors -> `left_right_2_no_padding`, global
  mini-batch = the step's samples, one epoch, shuffle off.
- actor / legacy (verl <= 0.7): `verl.workers.actor.dp_actor.DataParallelPPOActor.update_policy(DataProto)` with the
  module wrapped by verl's `apply_fsdp2` (fsdp2) or FSDP1, `ppo_mini_batch_size` per GPU as fsdp_workers passes it.
- critic / engine (verl >= 0.7): `TrainingWorker(model_type="value_model").train_mini_batch(td)` with `value_loss`
  (`FSDPCriticConfig`), a `LlamaForTokenClassification(num_labels=1)` value head whose `score.weight` is the
  canonical name.

RL data: responses are the spec's; advantages are Sample.advantage on every response token; old log-probs (actor)
and old values (critic) are computed with a plain transformers forward of the current weights, so the PPO ratio is
1 and no clipping acts (the legacy actor ignores them and uses log_prob.detach() on-policy); returns are
Sample.value_target. Responses are right-padded to the step's longest response (or rl.max_response_len), which is
verl's seq-mean-token-sum-norm horizon.

Read-outs: gradients are snapshotted after accumulation and before clipping by wrapping the optimizer-step method
of the engine instance (`engine.optimizer_step`), of the legacy actor instance (`actor._optimizer_step`) or the clip
call of the legacy SFT trainer; FSDP2 DTensor grads are `.full_tensor()`ed, FSDP1 grads read inside
`summon_full_params(with_grads=True)` (use_orig_params=True). Parameters after the step the same way. Loss: the
loss verl reports (worker metrics 'loss'; legacy actor 'actor/pg_loss'; legacy SFT 'train/loss'); grad norm: the
norm verl's clip returns.

CPU on verl's terms (Patch list below, also in `stepdiff list`): P1 a CPU platform registered through
`verl.plugin.platform` (>= 0.9); P2 attn_implementation fixed through HFModelConfig.override_config (config only);
P3 FSDP engines registered for device 'cpu' in EngineRegistry (0.7/0.8) or VERL_ENGINE_DEVICE=cuda for the lookup
(0.9); P4 FSDP1 sync_module_states check skipped for CPU params; P5 pure-torch unpad/pad for
verl.utils.attention_utils (0.5-0.8, imports flash_attn otherwise); P6 hard-coded bf16 torch.autocast disabled in
the modules that hard-code it (0.7 engine, 0.5/0.6 fsdp_sft_trainer; otherwise 4e-3 error); P7 torch.cpu
memory statistics; P8 load_valuehead_model without flash_attention_2; P10 a stub `ray` module (not installed).
fp32 everywhere: model_dtype/mixed_precision fp32 (engine), fsdp_config.dtype fp32 (legacy actor).

Config normalisation (one spec onto verl's knobs): engine mini-batch sizes are global (TrainingWorker divides by
dp), the legacy actor's ppo_mini_batch_size is per GPU (what fsdp_workers passes after its own division);
micro_batch_size_per_gpu = batch.micro_batch_size; use_dynamic_bsz=False; shuffle False; no balancing; clipping set
through both `optim.clip_grad` and the actor's `grad_clip`; verl has no "off" switch for clipping, so
clip_grad_norm = 0 becomes 1e9 (the clip coefficient clamps to exactly 1).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stepdiff.harness import data as D
from stepdiff.harness.record import Record, RecordMeta, StepRecord
from stepdiff.harness.spec import Spec, doc

from .base import Adapter, Capabilities, Patch, WorkerContext, build_model, framework_versions, set_dist_env


@dataclass(frozen=True)
class VerlKnobs:
    path: Literal["sft", "actor", "critic"] = doc("sft", "Which verl training path runs (must match loss.kind: sft, "
                                                         "policy, value).")
    impl: Literal["auto", "engine", "legacy"] = doc(
        "auto", "verl's model-engine TrainingWorker (>= 0.7), the legacy fsdp_sft_trainer (<= 0.6) / dp_actor "
        "(<= 0.7), or auto: the release's own default (legacy SFT trainer while it ships, legacy actor while "
        "use_legacy_worker_impl=auto picks it (<= 0.7), the engine otherwise; the critic is always the engine).")
    strategy: Literal["fsdp2", "fsdp1"] = doc("fsdp2", "FSDP implementation (fsdp1 at world size 1 only).")
    use_remove_padding: bool = doc(True, "verl's use_remove_padding (packed sequences); 0.7.x engine without it "
                                         "builds the attention mask from the padded response mask.")


PATCHES = (
    Patch("verl.plugin.platform (PlatformCPU)", "a CPU platform registered with PlatformRegistry.register('cpu') and "
          "set_platform (verl >= 0.9)", "verl's own plugin API; otherwise it falls back to 'nvidia' and calls "
          "torch.cuda; device placement only"),
    Patch("HFModelConfig.override_config.attn_implementation", "the spec's attention kernel (config only)",
          "the default is flash_attention_2, which needs flash-attn and a GPU"),
    Patch("verl.workers.engine.EngineRegistry (device 'cpu')", "FSDP engines registered for device 'cpu' (0.7/0.8); "
          "VERL_ENGINE_DEVICE=cuda for the lookup (0.9)", "the registry keys engines on cuda/npu only; lookup only"),
    Patch("torch.distributed.fsdp._init_utils._check_module_states_for_sync_module_states", "no-op (FSDP1 only)",
          "torch refuses sync_module_states with CPU parameters; gloo broadcasts them fine"),
    Patch("verl.utils.attention_utils._get_attention_functions", "pure-torch unpad_input/pad_input/index_first_axis "
          "(0.5-0.8)", "they import flash_attn.bert_padding on non-NPU hosts; verl 0.9 ships the same fallbacks"),
    Patch("<module>.torch.autocast", "a disabled torch.autocast, only in the modules that hard-code bf16 autocast "
          "(0.7 engine transformer_impl, 0.5/0.6 fsdp_sft_trainer)",
          "fp32 everywhere: the hard-coded bf16 autocast really computes in bf16 (on CPU too) and moves gradients by "
          "~4e-3"),
    Patch("torch.cpu memory statistics", "memory_allocated / max_memory_* etc. return 0 where torch.cpu lacks them",
          "verl logs GPU memory; logging only"),
    Patch("verl.utils.model.load_valuehead_model", "AutoModelForTokenClassification.from_pretrained with the spec's "
          "attention kernel (0.8/0.9)", "the release hard-codes flash_attention_2"),
    Patch("ray", "a stub module (ray is not installed)", "verl imports ray at module level; nothing ray-backed runs"),
)
READOUTS = (
    "gradients: snapshot in a wrapper of engine.optimizer_step / actor._optimizer_step / the legacy SFT clip call "
    "(after accumulation, before clipping; FSDP2 DTensor.full_tensor, FSDP1 summon_full_params(with_grads=True))",
    "parameters after the step: the same unsharding",
    "loss: verl's reported loss (worker metrics 'loss', legacy actor 'actor/pg_loss', legacy SFT 'train/loss')",
    "grad norm: the norm verl's clip call returns",
)
CLIP_OFF = 1e9


def _vt(version: str | None) -> tuple[int, int]:
    if not version:
        return (0, 9)
    parts = version.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def _deps(version: str | None) -> list[str]:
    """verl is installed --no-deps (its full requirements pull ray[default], vllm pins, wandb ...): these are what
    the code paths driven here import (cpu-recipe-verl.md section 1), without ray (P10). tensordict is pinned to
    0.10.0 for >= 0.7 (DataProto.to_tensordict asserts >= 0.10; uv otherwise settles on 0.8.3)."""
    v = _vt(version)
    common = ["packaging", "hydra-core", "codetiming", "peft", "datasets>=3", "torchdata", "pillow", "psutil"]
    if v >= (0, 9):
        return [*common, "numpy>=2", "tensordict==0.10.0", "transformers>=5.5.3,<5.11,!=5.6.0",
                "uvicorn", "fastapi"]
    if v >= (0, 7):
        return [*common, "numpy<2", "tensordict==0.10.0", "transformers<5", "uvicorn", "fastapi",
                "einops", "pyarrow>=19,<22"]
    return [*common, "numpy<2", "tensordict>=0.8,<=0.9.1,!=0.9.0", "transformers<4.56", "einops", "pyarrow>=19,<22"]


class VerlAdapter(Adapter):
    name = "verl"
    capabilities = Capabilities(
        framework="verl",
        runs="sft/engine: TrainingWorker.train_batch + sft_loss; actor/engine: TrainingWorker.train_mini_batch + "
             "ppo_loss; critic/engine: TrainingWorker(value_model).train_mini_batch + value_loss (FSDPEngine "
             "forward_backward_batch + optimizer_step); actor/legacy: DataParallelPPOActor.update_policy; "
             "sft/legacy: FSDPSFTTrainer.training_step",
        readouts=READOUTS,
        knobs=("path", "impl", "strategy", "use_remove_padding"),
        devices=("cpu", "cuda"),
        world_sizes="1, 2 with fsdp2 (gloo on CPU, nccl on CUDA); fsdp1 at world size 1",
        dtypes=("float32",),
        optimizers=("sgd", "adamw"),
        loss_kinds=("sft", "policy", "value"),
        patches=PATCHES,
        notes=(
            "engine paths need verl >= 0.7; legacy actor <= 0.7.x; legacy fsdp_sft_trainer <= 0.6.x",
            "clip_grad_norm = 0 is verl clip 1e9 (verl has no off switch; the coefficient clamps to exactly 1)",
            "advantages are token-level Sample.advantage; old log-probs/values are the current ones (ratio 1)",
            "the 0.7.x engine critic without use_remove_padding crashes in verl (values not squeezed)",
        ),
    )

    @classmethod
    def requirements(cls, version: str | None) -> list[str]:
        return _deps(version)

    @classmethod
    def install_steps(cls, version: str | None) -> list[list[str]]:
        return [["--no-deps", f"verl=={version}" if version else "verl"]]

    @classmethod
    def unsupported(cls, spec: Spec, version: str | None = None) -> str | None:
        reason = super().unsupported(spec, version)
        if reason:
            return reason
        k: VerlKnobs = spec.knobs_for(cls.name)
        want = {"sft": "sft", "actor": "policy", "critic": "value"}[k.path]
        if spec.loss.kind != want:
            return f"verl.path = {k.path!r} trains loss.kind = {want!r}, the spec has {spec.loss.kind!r}"
        if k.path == "sft" and spec.loss.aggregation != "token-mean":
            return "verl's SFT losses have no aggregation knob (token mean); loss.aggregation must be 'token-mean'"
        if k.path == "critic" and k.impl == "legacy":
            return "verl.impl = 'legacy' has no critic here (the legacy dp_critic is not driven); use impl = 'engine'"
        if k.path != "sft":
            if spec.data.supervise != "response":
                return "verl's RL losses train response tokens only: data.supervise must be 'response'"
            if spec.rl.advantage != "given":
                return "the verl adapter takes advantages as given (Sample.advantage): rl.advantage must be 'given'"
            if spec.rl.mask_truncated:
                return "rl.mask_truncated has no verl equivalent in these paths"
            if any(not s.prompt for s in D.samples(spec)):
                return "verl's RL paths need a non-empty prompt in every sample"
        if k.strategy == "fsdp1" and spec.batch.world_size > 1:
            return ("verl.strategy = 'fsdp1' at world size > 1: gradients cannot be read back on CPU (torch FSDP1 "
                    "unshard fails); use fsdp2")
        return None

    # ------------------------------------------------------------------------------------------------------------
    def setup(self, ctx: WorkerContext) -> None:
        from . import verl_cpu

        set_dist_env(ctx)
        applied: list[str] = []
        applied += verl_cpu.install_ray_stub()
        if ctx.device == "cpu":
            os.environ["VERL_ENGINE_DEVICE"] = "cuda"  # P3 (0.9): EngineRegistry lookup key only
            applied += verl_cpu.install_cpu_platform()
        import torch
        import torch.distributed as dist

        if ctx.device == "cuda":
            torch.cuda.set_device(ctx.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(ctx.backend, rank=ctx.rank, world_size=ctx.world_size)
        import verl

        ctx.state["version"] = getattr(verl, "__version__", "unknown")
        applied += verl_cpu.patch_attention_utils()  # only where flash_attn is missing (always on CPU)
        if ctx.device == "cpu":
            applied += verl_cpu.patch_cpu_memory_stats()
            applied += verl_cpu.patch_fsdp1_sync_module_states()
        ctx.state["patches"] = applied

    # ------------------------------------------------------------------------------------------------------------
    def run(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Record:
        t0 = time.perf_counter()
        k: VerlKnobs = spec.knobs_for(self.name)
        if ctx.world_size != spec.batch.world_size:
            raise RuntimeError(f"worker world size {ctx.world_size} != batch.world_size {spec.batch.world_size}")
        version = ctx.state["version"]
        run_patches = list(ctx.state.get("patches", []))
        notes: list[str] = []
        impl = self._resolve_impl(k, version)
        if impl != k.impl:
            notes.append(f"impl = 'auto' resolved to {impl!r} (verl {version}'s default for this path)")
        k = dataclasses.replace(k, impl=impl)  # type: ignore[arg-type]
        if spec.optimizer.clip_grad_norm == 0:
            notes.append(f"clip_grad_norm = 0: verl has no 'off' switch, clip set to {CLIP_OFF:g} (coefficient 1)")
        if k.impl == "engine":
            if _vt(version) < (0, 7):
                raise RuntimeError(f"verl {version} has no model-engine TrainingWorker (>= 0.7); use impl = 'legacy'")
            steps, extra = self._run_engine(spec, init_path, ctx, k, run_patches, notes)
        elif k.path == "actor":
            steps, extra = self._run_legacy_actor(spec, init_path, ctx, k, run_patches, notes)
        else:
            steps, extra = self._run_legacy_sft(spec, init_path, ctx, k, run_patches, notes)
        code_path = {
            ("sft", "engine"): "verl.workers.engine_workers.TrainingWorker.train_batch + verl.workers.utils.losses."
                               "sft_loss (FSDPEngineWithLMHead)",
            ("actor", "engine"): "verl.workers.engine_workers.TrainingWorker.train_mini_batch + verl.workers.utils."
                                 "losses.ppo_loss (FSDPEngineWithLMHead)",
            ("critic", "engine"): "verl.workers.engine_workers.TrainingWorker(value_model).train_mini_batch + "
                                  "verl.workers.utils.losses.value_loss (FSDPEngineWithValueHead)",
            ("actor", "legacy"): "verl.workers.actor.dp_actor.DataParallelPPOActor.update_policy",
            ("sft", "legacy"): "verl.trainer.fsdp_sft_trainer.FSDPSFTTrainer.training_step",
        }[(k.path, k.impl)]
        meta = RecordMeta(
            adapter=self.name, framework_version=version,
            code_path=f"{code_path} [{k.strategy}, use_remove_padding={k.use_remove_padding}]", readout=READOUTS[0],
            device=ctx.device, world_size=ctx.world_size, dtype=spec.model.dtype,
            versions=framework_versions("verl", "tensordict", "numpy"), warnings=notes,
            timings={"run_s": time.perf_counter() - t0}, patches=self._patches_applied(run_patches, k), extra=extra,
        )
        return Record(meta=meta, steps=steps)

    @staticmethod
    def _patches_applied(run_patches: list[str], k: VerlKnobs) -> list[str]:
        """Every patch in force in this process (they persist across runs), plus the config-only ones of this run;
        FSDP1's check skip only where FSDP1 ran."""
        from . import verl_cpu

        out = set(run_patches) | set(verl_cpu.APPLIED)
        if k.strategy != "fsdp1":
            out.discard(PATCHES[3].target)
        return sorted(out)

    @staticmethod
    def _resolve_impl(k: VerlKnobs, version: str) -> str:
        if k.impl != "auto":
            return k.impl
        if k.path == "sft":
            return "legacy" if _has_module("verl.trainer.fsdp_sft_trainer") else "engine"
        if k.path == "actor":
            return "legacy" if _has_module("verl.workers.actor.dp_actor") else "engine"
        return "engine"

    # ------------------------------------------------------------------------------------------------------------
    # shared helpers

    @staticmethod
    def _model_dir(spec: Spec, init_path: Path, ctx: WorkerContext) -> tuple[Path, Any]:
        """The spec's initial model saved as an HF directory (safetensors) for verl to load; also returns the model
        (a 'shadow' used only to compute old log-probs / old values)."""
        model = build_model(spec, init_path)
        if spec.loss.kind == "value":
            model.config.classifier_dropout = 0.0
            model.dropout.p = 0.0
        d = ctx.scratch / f"model-{init_path.stem}-{spec.loss.kind}"
        model.save_pretrained(str(d), safe_serialization=True)
        model.eval()
        return d, model

    @staticmethod
    def _clip(spec: Spec) -> float:
        return float(spec.optimizer.clip_grad_norm) if spec.optimizer.clip_grad_norm > 0 else CLIP_OFF

    @staticmethod
    def _optim_kwargs(spec: Spec) -> dict[str, Any]:
        o = spec.optimizer
        if o.name == "sgd":
            return dict(optimizer="SGD", optimizer_impl="torch.optim", lr=o.lr, weight_decay=o.weight_decay,
                        override_optimizer_config={"momentum": o.momentum})
        return dict(optimizer="AdamW", optimizer_impl="torch.optim", lr=o.lr, weight_decay=o.weight_decay,
                    betas=tuple(o.betas), override_optimizer_config={"eps": o.eps})

    @staticmethod
    def _rank_indices(spec: Spec, step: int, rank: int) -> list[int]:
        return [i for m in range(spec.batch.grad_accum) for i in D.micro_batch_indices(spec, step, rank, m)]

    @staticmethod
    def _response_horizon(spec: Spec, step: int) -> int:
        smp = D.samples(spec)
        b = spec.batch
        longest = max(len(smp[i].response) for r in range(b.world_size)
                      for i in VerlAdapter._rank_indices(spec, step, r))
        return max(longest, spec.rl.max_response_len)

    def _ppo_tensors(self, spec: Spec, step: int, ctx: WorkerContext, shadow: Any) -> dict[str, Any]:
        """verl's left/right-padded PPO batch of this rank's samples, in the spec's order."""
        import torch

        smp = D.samples(spec)
        idx = self._rank_indices(spec, step, ctx.rank)
        rows = [smp[i] for i in idx]
        pad = spec.data.pad_id
        p_len = max(len(s.prompt) for s in rows)
        r_len = self._response_horizon(spec, step)
        n = len(rows)
        prompts = torch.full((n, p_len), pad, dtype=torch.long)
        responses = torch.full((n, r_len), pad, dtype=torch.long)
        p_mask = torch.zeros((n, p_len), dtype=torch.long)
        r_mask = torch.zeros((n, r_len), dtype=torch.long)
        for b, s in enumerate(rows):
            prompts[b, p_len - len(s.prompt):] = torch.tensor(s.prompt)
            p_mask[b, p_len - len(s.prompt):] = 1
            responses[b, : len(s.response)] = torch.tensor(s.response)
            r_mask[b, : len(s.response)] = 1
        input_ids = torch.cat([prompts, responses], dim=1)
        attention_mask = torch.cat([p_mask, r_mask], dim=1)
        position_ids = torch.clamp(torch.cumsum(attention_mask, dim=1) - 1, min=0)
        adv = torch.tensor([s.advantage for s in rows], dtype=torch.float32)[:, None] * r_mask
        out = dict(prompts=prompts, responses=responses, input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, response_mask=r_mask, advantages=adv)
        # old log-probs / old values: a plain forward of the current weights (ratio 1, value clip inactive)
        with torch.no_grad():
            o = shadow(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
            if spec.loss.kind == "value":
                v = o.logits.squeeze(-1).float()[:, p_len - 1: p_len - 1 + r_len]
                out["values"] = v * r_mask
                out["returns"] = torch.tensor([s.value_target for s in rows], dtype=torch.float32)[:, None] * r_mask
            else:
                logits = o.logits.float()[:, p_len - 1: p_len - 1 + r_len]
                lp = torch.log_softmax(logits, dim=-1).gather(-1, responses[..., None]).squeeze(-1)
                out["old_log_probs"] = lp * r_mask
        return out

    @staticmethod
    def _clean(name: str) -> str:
        for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
            name = name.replace(junk, "")
        return name

    def _full(self, module: Any, what: str) -> dict[str, Any]:
        """Unsharded fp32 copies of parameters or gradients under canonical names (collective: every rank calls)."""
        import torch
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            from torch.distributed._tensor import DTensor
        fsdp1 = isinstance(module, FSDP)
        ctx = FSDP.summon_full_params(module, writeback=False, with_grads=(what == "grad")) if fsdp1 else nullcontext()
        out = {}
        with ctx:
            for n, p in module.named_parameters():
                t = p if what == "param" else p.grad
                if t is None:
                    t = torch.zeros_like(p)
                if isinstance(t, DTensor):
                    t = t.full_tensor()
                out[self._clean(n)] = t.detach().float().cpu().clone()
        return out

    @staticmethod
    def _load_shadow(shadow: Any, params: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for n, p in shadow.named_parameters():
                if n in params:
                    p.copy_(params[n].to(p.dtype))

    @staticmethod
    def _fields(cls: Any, kwargs: dict[str, Any], notes: list[str]) -> dict[str, Any]:
        """Keep the kwargs this release's config dataclass has; note the dropped ones."""
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        dropped = [k for k in kwargs if k not in names]
        if dropped:
            notes.append(f"{cls.__name__} has no {', '.join(dropped)} in this release (not set)")
        return {k: v for k, v in kwargs.items() if k in names}

    @staticmethod
    def _autocast_patch(modules: list[str]) -> list[str]:
        """P6 only where the module source hard-codes bf16 autocast."""
        import importlib

        from . import verl_cpu

        hard = []
        for m in modules:
            try:
                src = inspect.getsource(importlib.import_module(m))
            except (ImportError, OSError, TypeError):
                continue
            if "autocast(" in src and "dtype=torch.bfloat16)" in src:
                hard.append(m)
        return verl_cpu.patch_cpu_autocast(hard)

    # ------------------------------------------------------------------------------------------------------------
    # engine paths (TrainingWorker)

    def _run_engine(self, spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str],
                    notes: list[str]) -> tuple[list[StepRecord], dict[str, Any]]:
        import torch
        from tensordict import NonTensorData

        from . import verl_cpu

        version = ctx.state["version"]
        if ctx.device == "cpu":
            patches += verl_cpu.register_cpu_engines()
        patches += self._autocast_patch(["verl.workers.engine.fsdp.transformer_impl"])
        if k.path == "critic":
            patches += verl_cpu.patch_valuehead_loader(spec.model.attn_implementation)
        patches.append(PATCHES[1].target)
        from verl.trainer.config import CheckpointConfig
        from verl.utils import tensordict_utils as tu
        from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
        from verl.workers.engine_workers import TrainingWorker, TrainingWorkerConfig
        from verl.workers.utils import losses

        b = spec.batch
        rmpad = k.use_remove_padding
        model_dir, shadow = self._model_dir(spec, init_path, ctx)
        override: dict[str, Any] = {"attn_implementation": spec.model.attn_implementation}
        if k.path == "critic":
            override.update({"architectures": ["LlamaForTokenClassification"], "num_labels": 1,
                             "classifier_dropout": 0.0})
        model_cfg = HFModelConfig(**self._fields(HFModelConfig, dict(
            path=str(model_dir), load_tokenizer=False, use_remove_padding=rmpad, override_config=override,
            enable_gradient_checkpointing=False, trust_remote_code=False), notes))
        fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
        engine_cfg = FSDPEngineConfig(**self._fields(FSDPEngineConfig, dict(
            strategy="fsdp2" if k.strategy == "fsdp2" else "fsdp", use_dynamic_bsz=False,
            micro_batch_size_per_gpu=b.micro_batch_size, infer_micro_batch_size_per_gpu=b.micro_batch_size,
            mixed_precision=fp32, model_dtype="fp32", use_torch_compile=False, use_remove_padding=rmpad,
            use_orig_params=(k.strategy == "fsdp1"), param_offload=False, optimizer_offload=False,
            offload_policy=False, forward_only=False), notes))
        optim_cfg = FSDPOptimizerConfig(**self._fields(FSDPOptimizerConfig, dict(
            **self._optim_kwargs(spec), clip_grad=self._clip(spec), total_training_steps=b.steps,
            lr_scheduler_type="constant", lr_warmup_steps=0, lr_warmup_steps_ratio=0.0), notes))
        model_type = "value_model" if k.path == "critic" else "language_model"
        worker_cfg = TrainingWorkerConfig(**self._fields(TrainingWorkerConfig, dict(
            model_type=model_type, model_config=model_cfg, engine_config=engine_cfg, optimizer_config=optim_cfg,
            checkpoint_config=CheckpointConfig()), notes))
        worker = TrainingWorker(config=worker_cfg)
        G = spec.samples_per_step
        if k.path == "sft":
            loss_cfg = None
            worker.set_loss_fn(loss_fn=_partial(losses.sft_loss, config=None))
        elif k.path == "actor":
            from verl.workers.config import FSDPActorConfig

            loss_cfg = FSDPActorConfig(**self._fields(FSDPActorConfig, dict(
                strategy="fsdp2" if k.strategy == "fsdp2" else "fsdp", rollout_n=1, ppo_mini_batch_size=G,
                ppo_micro_batch_size_per_gpu=b.micro_batch_size, use_dynamic_bsz=False,
                loss_agg_mode=spec.loss.aggregation, clip_ratio=spec.rl.clip_ratio_low,
                clip_ratio_low=spec.rl.clip_ratio_low, clip_ratio_high=spec.rl.clip_ratio_high, entropy_coeff=0.0,
                calculate_entropy=False, use_kl_loss=False, ppo_epochs=1, shuffle=False, use_torch_compile=False,
                use_remove_padding=rmpad, grad_clip=self._clip(spec), optim=optim_cfg), notes))
            worker.set_loss_fn(loss_fn=_partial(losses.ppo_loss, config=loss_cfg))
        else:
            from verl.workers.config import FSDPCriticConfig

            loss_cfg = FSDPCriticConfig(**self._fields(FSDPCriticConfig, dict(
                strategy="fsdp2" if k.strategy == "fsdp2" else "fsdp", rollout_n=1, ppo_mini_batch_size=G,
                ppo_micro_batch_size_per_gpu=b.micro_batch_size, use_dynamic_bsz=False,
                loss_agg_mode=spec.loss.aggregation, cliprange_value=spec.rl.value_clip, ppo_epochs=1,
                shuffle=False, grad_clip=self._clip(spec), optim=optim_cfg, model_config=model_cfg), notes))
            worker.set_loss_fn(loss_fn=_partial(losses.value_loss, config=loss_cfg))
        worker.reset()
        engine = worker.engine
        snap: dict[str, Any] = {}
        original_step = engine.optimizer_step

        def optimizer_step_with_readout() -> Any:
            snap["grads"] = self._full(engine.module, "grad")  # after accumulation, before clipping
            return original_step()

        engine.optimizer_step = optimizer_step_with_readout
        smp = D.samples(spec)
        steps: list[StepRecord] = []
        for s in range(b.steps):
            if k.path == "sft":
                td = self._sft_tensordict(spec, s, ctx, smp, tu, NonTensorData)
                out = worker.train_batch(td)
            else:
                td = self._ppo_tensordict(spec, s, ctx, shadow, tu)
                out = worker.train_mini_batch(td)
            metrics = tu.get(out, "metrics") if out is not None else {}
            params = self._full(engine.module, "param")
            if "grads" not in snap:
                raise RuntimeError("verl's engine did not call optimizer_step (no gradient read)")
            loss = _scalar(metrics.get("loss"))
            norm = _scalar(metrics.get("grad_norm"))
            steps.append(StepRecord(loss=loss, grad_norm=norm, grads=snap.pop("grads"), params=params))
            if k.path != "sft":
                self._load_shadow(shadow, params)
        torch.distributed.barrier()
        extra = {"verl_config": {
            "engine": _asdict(engine_cfg), "optim": _asdict(optim_cfg), "loss": _asdict(loss_cfg),
            "global_batch_size": G, "micro_batch_size_per_gpu": b.micro_batch_size,
            "use_remove_padding": rmpad, "version": version}}
        return steps, extra

    def _sft_tensordict(self, spec: Spec, step: int, ctx: WorkerContext, smp: Any, tu: Any, ntd: Any) -> Any:
        import torch

        idx = self._rank_indices(spec, step, ctx.rank)
        ids, pos, mask = [], [], []
        for i in idx:
            s = smp[i]
            seq = (*s.prompt, *s.response)
            ids.append(torch.tensor(seq, dtype=torch.long))
            pos.append(torch.arange(len(seq), dtype=torch.long))
            mask.append(torch.tensor([0, *[int(x) for x in D.supervised_targets(spec, s)]], dtype=torch.long))
        tensors = {"input_ids": torch.nested.as_nested_tensor(ids, layout=torch.jagged),
                   "position_ids": torch.nested.as_nested_tensor(pos, layout=torch.jagged),
                   "loss_mask": torch.nested.as_nested_tensor(mask, layout=torch.jagged)}
        meta = {"use_remove_padding": spec.knobs_for(self.name).use_remove_padding, "use_dynamic_bsz": False,
                "max_token_len_per_gpu": None, "micro_batch_size_per_gpu": spec.batch.micro_batch_size,
                "temperature": 1.0, "global_batch_size": spec.samples_per_step, "pad_token_id": spec.data.pad_id}
        td = tu.get_tensordict(tensor_dict=tensors, non_tensor_dict=meta)
        seqlens = [len(smp[i].prompt) + len(smp[i].response) for r in range(spec.batch.world_size)
                   for i in self._rank_indices(spec, step, r)]
        tu.assign_non_tensor(td, update_lr_scheduler=True, global_token_num=ntd(seqlens))
        return td

    def _ppo_tensordict(self, spec: Spec, step: int, ctx: WorkerContext, shadow: Any, tu: Any) -> Any:
        from verl import DataProto
        from verl.workers.utils.padding import left_right_2_no_padding

        tensors = self._ppo_tensors(spec, step, ctx, shadow)
        td = DataProto.from_dict(tensors=tensors, meta_info={"temperature": 1.0}).to_tensordict()
        td = left_right_2_no_padding(td)
        G = spec.samples_per_step
        tu.assign_non_tensor(td, calculate_entropy=False, global_batch_size=G, mini_batch_size=G, epochs=1, seed=1,
                             dataloader_kwargs={"shuffle": False}, compute_loss=True, update_lr_scheduler=True)
        return td

    # ------------------------------------------------------------------------------------------------------------
    # legacy paths

    def _wrap_fsdp(self, model: Any, ctx: WorkerContext, k: VerlKnobs, patches: list[str]) -> Any:
        """The model wrapped the way verl's legacy fsdp workers wrap it: verl's apply_fsdp2 + fsdp2_load_full_state_dict
        (fsdp2) or FSDP1 with verl's wrap policy; fp32 mixed precision."""
        import torch
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(ctx.device, mesh_shape=(ctx.world_size,), mesh_dim_names=("fsdp",))
        if k.strategy == "fsdp2":
            from torch.distributed.fsdp import MixedPrecisionPolicy
            from verl.utils.fsdp_utils import apply_fsdp2, fsdp2_load_full_state_dict

            mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=True)
            full_state = model.state_dict()
            apply_fsdp2(model, {"mesh": mesh, "mp_policy": mp, "offload_policy": None,
                                "reshard_after_forward": True}, {"wrap_policy": {}})
            fsdp2_load_full_state_dict(model, full_state, mesh, None)
            return model
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
        from verl.utils.fsdp_utils import get_fsdp_wrap_policy

        mp1 = MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
        return FSDP(model, auto_wrap_policy=get_fsdp_wrap_policy(module=model, config={}), device_id=ctx.torch_device
                    if ctx.device == "cuda" else torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD,
                    mixed_precision=mp1, sync_module_states=True, device_mesh=mesh, use_orig_params=True)

    def _torch_optimizer(self, spec: Spec, module: Any) -> Any:
        """What verl's legacy workers build: torch.optim.<name>(params, lr, weight_decay[, betas] + overrides)."""
        import torch

        kw = self._optim_kwargs(spec)
        args: dict[str, Any] = {"lr": kw["lr"], "weight_decay": kw["weight_decay"]}
        if "betas" in kw:
            args["betas"] = kw["betas"]
        args.update(kw["override_optimizer_config"])
        return getattr(torch.optim, kw["optimizer"])(module.parameters(), **args)

    def _run_legacy_actor(self, spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str],
                          notes: list[str]) -> tuple[list[StepRecord], dict[str, Any]]:
        import torch

        try:
            from verl.workers.actor.dp_actor import DataParallelPPOActor
        except ImportError as e:
            raise RuntimeError(f"verl {ctx.state['version']} has no legacy dp_actor (removed in 0.8): {e}") from None
        from verl import DataProto
        from verl.workers.config import FSDPActorConfig, FSDPEngineConfig

        b = spec.batch
        _, shadow = self._model_dir(spec, init_path, ctx)
        model = build_model(spec, init_path).to(ctx.torch_device)
        model.train()
        module = self._wrap_fsdp(model, ctx, k, patches)
        optimizer = self._torch_optimizer(spec, module)
        per_gpu = b.micro_batch_size * b.grad_accum  # fsdp_workers: ppo_mini_batch_size * rollout_n // dp
        strategy = "fsdp2" if k.strategy == "fsdp2" else "fsdp"
        cfg = FSDPActorConfig(**self._fields(FSDPActorConfig, dict(
            strategy=strategy, rollout_n=1, ppo_mini_batch_size=per_gpu,
            ppo_micro_batch_size_per_gpu=b.micro_batch_size,
            use_dynamic_bsz=False, loss_agg_mode=spec.loss.aggregation, clip_ratio=spec.rl.clip_ratio_low,
            clip_ratio_low=spec.rl.clip_ratio_low, clip_ratio_high=spec.rl.clip_ratio_high, entropy_coeff=0.0,
            calculate_entropy=False, use_kl_loss=False, ppo_epochs=1, shuffle=False, use_torch_compile=False,
            use_remove_padding=k.use_remove_padding, grad_clip=self._clip(spec),
            fsdp_config=FSDPEngineConfig(**self._fields(FSDPEngineConfig, dict(dtype="fp32", strategy=strategy,
                                                                                model_dtype="fp32"), notes))),
            notes))
        actor = DataParallelPPOActor(config=cfg, actor_module=module, actor_optimizer=optimizer)
        snap: dict[str, Any] = {}
        original = actor._optimizer_step

        def optimizer_step_with_readout() -> Any:
            snap["grads"] = self._full(module, "grad")
            norm = original()
            snap["norm"] = norm
            return norm

        actor._optimizer_step = optimizer_step_with_readout
        steps = []
        for s in range(b.steps):
            tensors = self._ppo_tensors(spec, s, ctx, shadow)
            data = DataProto.from_dict(tensors=tensors,
                                       meta_info={"temperature": 1.0, "pad_token_id": spec.data.pad_id})
            metrics = actor.update_policy(data)
            params = self._full(module, "param")
            if "grads" not in snap:
                raise RuntimeError("DataParallelPPOActor.update_policy did not step the optimizer")
            loss = _scalar(metrics.get("actor/pg_loss"))
            t = torch.tensor([loss], dtype=torch.float64)
            torch.distributed.all_reduce(t)  # pg_loss is per rank (a per-rank mean): summed over ranks / ws
            steps.append(StepRecord(loss=float(t) / ctx.world_size, grad_norm=_scalar(snap.pop("norm")),
                                    grads=snap.pop("grads"), params=params))
            self._load_shadow(shadow, params)
        notes.append("legacy actor: ppo_mini_batch_size is per GPU (fsdp_workers divides the global one by dp)")
        return steps, {"verl_config": {"actor": _asdict(cfg), "per_gpu_mini_batch": per_gpu}}

    def _run_legacy_sft(self, spec: Spec, init_path: Path, ctx: WorkerContext, k: VerlKnobs, patches: list[str],
                        notes: list[str]) -> tuple[list[StepRecord], dict[str, Any]]:
        import torch

        try:
            from verl.trainer import fsdp_sft_trainer as fst
        except ImportError as e:
            raise RuntimeError(f"verl {ctx.state['version']} has no legacy fsdp_sft_trainer (removed in 0.7.1): "
                               f"{e}") from None
        from omegaconf import OmegaConf
        from tensordict import TensorDict

        patches += self._autocast_patch(["verl.trainer.fsdp_sft_trainer"])
        b = spec.batch
        src = inspect.getsource(fst.FSDPSFTTrainer._compute_loss_and_backward)
        if 'loss_mask")[:, :-1]' in src:
            mask_convention = "prediction"  # mask[t] = 1: token t+1 is trained (<= 0.5)
        elif 'loss_mask")[:, 1:]' in src:
            mask_convention = "membership"  # mask[t] = 1: token t is trained (>= 0.6)
        else:
            raise RuntimeError("cannot tell this fsdp_sft_trainer's loss_mask convention from its source")
        model = build_model(spec, init_path).to(ctx.torch_device)
        model.train()
        module = self._wrap_fsdp(model, ctx, k, patches)
        optimizer = self._torch_optimizer(spec, module)
        tr = object.__new__(fst.FSDPSFTTrainer)
        tr.config = OmegaConf.create({
            "ulysses_sequence_parallel_size": 1,
            "data": {"micro_batch_size_per_gpu": b.micro_batch_size, "balance_dp_token": False,
                     "train_batch_size": spec.samples_per_step},
            "model": {"strategy": "fsdp2" if k.strategy == "fsdp2" else "fsdp"},
            "optim": {"clip_grad": self._clip(spec)},
        })
        tr.use_remove_padding = k.use_remove_padding  # only acts with ulysses sp > 1 in this trainer
        tr.device_name = "cuda" if ctx.device == "cuda" else "cpu"
        tr.model = model
        tr.fsdp_model = module
        tr.optimizer = optimizer
        tr.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        tr.device_mesh = None
        tr.ulysses_device_mesh = None
        tr.sharding_manager = None
        snap: dict[str, Any] = {}
        if k.strategy == "fsdp2":
            original_clip = fst.fsdp2_clip_grad_norm_

            def clip_with_readout(parameters: Any, *a: Any, **kw: Any) -> Any:
                snap["grads"] = self._full(module, "grad")
                norm = original_clip(parameters, *a, **kw)
                snap["norm"] = norm
                return norm

            fst.fsdp2_clip_grad_norm_ = clip_with_readout
        else:
            original_clip1 = module.clip_grad_norm_

            def clip1_with_readout(*a: Any, **kw: Any) -> Any:
                snap["grads"] = self._full(module, "grad")
                norm = original_clip1(*a, **kw)
                snap["norm"] = norm
                return norm

            module.clip_grad_norm_ = clip1_with_readout
        smp = D.samples(spec)
        steps = []
        try:
            for s in range(b.steps):
                idx = self._rank_indices(spec, s, ctx.rank)
                mb = D.collate(spec, idx, smp)
                mask = mb.loss_mask.clone()
                if mask_convention == "prediction":
                    mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
                pos = torch.clamp(torch.cumsum(mb.attention_mask, dim=1) - 1, min=0)
                batch = TensorDict({"input_ids": mb.input_ids, "attention_mask": mb.attention_mask,
                                    "position_ids": pos, "loss_mask": mask}, batch_size=[len(idx)])
                metrics = tr.training_step(batch)
                params = self._full(module, "param")
                if "grads" not in snap:
                    raise RuntimeError("FSDPSFTTrainer.training_step did not clip/step")
                loss = _scalar(metrics.get("train/loss"))
                steps.append(StepRecord(loss=loss, grad_norm=_scalar(snap.pop("norm")), grads=snap.pop("grads"),
                                        params=params))
        finally:
            if k.strategy == "fsdp2":
                fst.fsdp2_clip_grad_norm_ = original_clip
        notes.append(f"legacy SFT loss_mask given in the release's '{mask_convention}' convention")
        if ctx.world_size > 1:
            notes.append("legacy SFT reports rank 0's loss on CPU (it all-reduces only when CUDA is available)")
        return steps, {"verl_config": {"trainer": OmegaConf.to_container(tr.config)},
                       "loss_mask_convention": mask_convention}


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is absent
        return False


def _partial(fn: Any, **kw: Any) -> Any:
    from functools import partial

    return partial(fn, **kw)


def _scalar(x: Any) -> float:
    import math

    if x is None:
        return math.nan
    if isinstance(x, (list, tuple)):
        vals = [_scalar(v) for v in x]
        return float(sum(vals)) if vals else math.nan
    if hasattr(x, "value"):  # verl.utils.metric.Metric
        return _scalar(x.value)
    if hasattr(x, "item"):
        return float(x.item())
    return float(x)


def _asdict(cfg: Any) -> Any:
    import dataclasses

    if cfg is None:
        return None
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[f.name] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float, str, bool)) for x in v):
            out[f.name] = list(v)
        elif isinstance(v, dict) and all(isinstance(x, (int, float, str, bool)) for x in v.values()):
            out[f.name] = dict(v)
    return out
