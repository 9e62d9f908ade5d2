"""verl adapter: the spec's steps through verl's own training code (SFT trainers, engine workers, legacy actor).

What runs (knob `path` x `impl`; impl = "auto", the default, is the release's own default: the legacy SFT trainer
while verl ships it (<= 0.7.0), the legacy actor while `use_legacy_worker_impl=auto` picks it (<= 0.7.x), the engine
otherwise; the critic is always the engine), one module per code path:
- sft / engine: `engine_sft` (verl >= 0.7): `verl.trainer.sft_trainer.SFTTrainer(config)` built by its own
  constructor from its hydra config; its MultiTurnSFTDataset, dataloader, TrainingWorker, FSDP engine, optimizer;
  fit()'s loop body per step (TrainingWorker.train_batch + sft_loss);
- sft / legacy: `legacy_sft` (verl <= 0.7.0): `verl.trainer.fsdp_sft_trainer.FSDPSFTTrainer(...)` built the way its
  run_sft builds it, with its own SFTDataset / MultiTurnSFTDataset (`verl.dataset`), FSDP wrapping, optimizer and
  scheduler; fit()'s loop body per step (training_step);
- actor / engine: `engine_actor` (TrainingWorker.train_mini_batch + ppo_loss, verl >= 0.7);
- critic / engine: `engine_critic` (TrainingWorker(value_model).train_mini_batch + value_loss, verl >= 0.7);
- actor / legacy: `legacy_actor` (verl <= 0.7): `fsdp_workers.ActorRolloutRefWorker(config, role='actor')` built
  in-process from its hydra config; its init_model (FSDP wrapping, build_optimizer) and update_actor(DataProto) ->
  DataParallelPPOActor.update_policy.
The SFT paths read files stepdiff writes (`sft_data`: a local tokenizer whose ids are the spec's ids, the samples as
parquet in the trainer's sampler order, checked back row by row) through verl's own config (`trainer_config`). The
RL engine paths share `engine` (the TrainingWorker built in-process, no Ray); all share `common` (config mapping,
PPO batches, scalars).

What stepdiff still builds for verl (also in `stepdiff list`, with the reason): the RL batches (rollouts are
injected, never generated: no vLLM/SGLang on CPU) as `ray_trainer` hands them to the workers; the engine paths'
TrainingWorker/engine configs (the PPO trainer that would build them needs Ray and a rollout engine to construct).

RL data: responses are the spec's; advantages are Sample.advantage on every response token; old log-probs (actor)
and old values (critic) are computed with a plain transformers forward of the current weights, so the PPO ratio is
1 and no clipping acts; returns are Sample.value_target. Responses are right-padded to the step's longest response
(or rl.max_response_len), which is verl's seq-mean-token-sum-norm horizon.

Read-outs: gradients are snapshotted after accumulation and before clipping by wrapping the optimizer-step method
of the engine instance, of the legacy actor instance or the clip call of the legacy SFT trainer (`readouts.wrapped`,
restored after the run); FSDP2 DTensor grads are `.full_tensor()`ed, FSDP1 grads read inside
`summon_full_params(with_grads=True)` (use_orig_params=True). Parameters after the step the same way. Loss: the
loss verl reports; grad norm: the norm verl's clip returns.

CPU on verl's terms: the patches of `cpu` (also in `stepdiff list`). fp32 everywhere.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

from stepdiff._util import version_tuple
from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from ..base import Adapter, Capabilities, Driven, WorkerContext, knob_names
from ..common import has_module, set_dist_env
from . import cpu, sft_data
from .common import CLIP_OFF
from .knobs import VerlKnobs

PATHS = {
    ("sft", "engine"): "engine_sft",
    ("actor", "engine"): "engine_actor",
    ("critic", "engine"): "engine_critic",
    ("actor", "legacy"): "legacy_actor",
    ("sft", "legacy"): "legacy_sft",
}
"""(knob path, resolved impl) -> the code path module."""
READOUTS = (
    "gradients: snapshot in a wrapper of engine.optimizer_step / actor._optimizer_step / the legacy SFT clip call "
    "(after accumulation, before clipping; FSDP2 DTensor.full_tensor, FSDP1 summon_full_params(with_grads=True))",
    "parameters after the step: the same unsharding",
    "loss: verl's reported loss (worker metrics 'loss', legacy actor 'actor/pg_loss', legacy SFT 'train/loss')",
    "grad norm: the norm verl's clip call returns",
)
NEWEST = (0, 9)
"""The release line an unpinned environment gets (its dependency set)."""


def release(version: str | None) -> tuple[int, ...]:
    return version_tuple(version) if version else NEWEST


def _deps(version: str | None) -> list[str]:
    """verl is installed --no-deps (its full requirements pull ray[default], vllm pins, wandb ...): these are what
    the code paths driven here import (cpu-recipe-verl.md section 1), without ray (cpu.RAY_STUB). tensordict is pinned
    to 0.10.0 for >= 0.7 (DataProto.to_tensordict asserts >= 0.10; uv otherwise settles on 0.8.3)."""
    v = release(version)
    common = ["packaging", "hydra-core", "codetiming", "peft", "datasets>=3", "torchdata", "pillow", "psutil"]
    if v >= (0, 9):
        return [*common, "numpy>=2", "tensordict==0.10.0", "transformers>=5.5.3,<5.11,!=5.6.0",
                "uvicorn", "fastapi"]
    if v >= (0, 7):
        return [*common, "numpy<2", "tensordict==0.10.0", "transformers<5", "uvicorn", "fastapi",
                "einops", "pyarrow>=19,<22"]
    older = ["setuptools<81"] if v < (0, 5) else []  # 0.4's verl/__init__ imports pkg_resources
    return [*common, "numpy<2", "tensordict>=0.8,<=0.9.1,!=0.9.0", "transformers<4.56", "einops", "pyarrow>=19,<22",
            *older]


FLASH_ATTN = "2.8.3"
"""flash-attn's sdist, installed without building kernels: verl's remove-padding path imports its pure-torch
bert_padding module (cpu.FLASH_ATTN_KERNELS)."""
LEGACY_SFT_LAST = (0, 7, 0)
"""The last release that ships verl.trainer.fsdp_sft_trainer (removed in 0.7.1)."""


class VerlAdapter(Adapter):
    name = "verl"
    # `stepdiff fuzz`: the path follows loss.kind; the SFT dataset only matters for one path (fuzz it explicitly)
    fuzz_knobs: dict[str, tuple[object, ...]] = {"path": (), "dataset": ()}
    version_dists = ("verl", "tensordict", "numpy", "flash-attn")
    # verl <= 0.5's fsdp_sft_trainer (the SFT path's default there) builds only AdamW(lr, betas, weight_decay)
    conformance_optimizer = {"name": "adamw", "lr": 0.01}
    capabilities = Capabilities(
        framework="verl",
        runs="sft/engine: SFTTrainer(config) (its MultiTurnSFTDataset, dataloader, TrainingWorker, FSDP engine, "
             "optimizer) + fit()'s step: TrainingWorker.train_batch + sft_loss; sft/legacy: FSDPSFTTrainer(config, "
             "meshes, tokenizer, SFTDataset|MultiTurnSFTDataset) + fit()'s step: training_step; actor/engine: "
             "TrainingWorker.train_mini_batch + ppo_loss; critic/engine: TrainingWorker(value_model)."
             "train_mini_batch + value_loss (FSDPEngine forward_backward_batch + optimizer_step); actor/legacy: "
             "fsdp_workers.ActorRolloutRefWorker(role='actor').init_model + update_actor -> "
             "DataParallelPPOActor.update_policy",
        readouts=READOUTS,
        knobs=knob_names(VerlKnobs),
        devices=("cpu", "cuda"),
        world_sizes="1, 2 with fsdp2 (gloo on CPU, nccl on CUDA); fsdp1 at world size 1",
        dtypes=("float32",),
        optimizers=("sgd", "adamw"),
        loss_kinds=("sft", "policy", "value"),
        patches=cpu.PATCHES,
        notes=(
            "engine paths need verl >= 0.7; legacy actor <= 0.7.x; legacy fsdp_sft_trainer <= 0.7.0",
            "stepdiff builds for SFT only the files verl reads: a tokenizer whose ids are the spec's (no hub), the "
            "samples as parquet (in the sampler's order) and the model directory; verl builds every tensor and mask",
            "stepdiff builds for RL the batch ray_trainer hands the workers (rollouts injected: no vLLM/SGLang on "
            "CPU) and the engine paths' TrainingWorker configs (the PPO trainer that builds them needs Ray and a "
            "rollout); the legacy actor is fsdp_workers.ActorRolloutRefWorker(role='actor') from verl's config",
            "legacy SFT lr: verl's cosine schedule over 1e12 steps (equal to the constant lr in double precision; "
            "no constant schedule before 0.7); verl <= 0.5's SFT trainer builds only AdamW",
            f"clip_grad_norm = 0 is verl clip {CLIP_OFF:g} (verl has no off switch; the coefficient clamps to "
            "exactly 1)",
            "advantages are token-level Sample.advantage; old log-probs/values are the current ones (ratio 1)",
            "the 0.7.x engine critic without use_remove_padding crashes in verl (values not squeezed)",
        ),
    )

    @classmethod
    def requirements(cls, version: str | None) -> list[str]:
        return _deps(version)

    @classmethod
    def install_steps(cls, version: str | None) -> list[list[str]]:
        return [["--no-deps", f"verl=={version}" if version else "verl"],
                ["--no-deps", "--no-build-isolation", f"flash-attn=={FLASH_ATTN}"]]

    @classmethod
    def build_env(cls, version: str | None) -> dict[str, str]:
        return {"FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE", "FLASH_ATTENTION_FORCE_BUILD": "TRUE"}

    @staticmethod
    def host_impl(k: VerlKnobs, version: str | None) -> str:
        """`resolve_impl` decided on the host from the release number (the worker decides from what is installed:
        the same answer for every release)."""
        if k.impl != "auto":
            return k.impl
        v = release(version)
        if k.path == "sft":
            return "legacy" if v <= LEGACY_SFT_LAST else "engine"
        if k.path == "actor":
            return "legacy" if v < (0, 8) else "engine"
        return "engine"

    @classmethod
    def unsupported_sft(cls, spec: Spec, version: str | None, k: VerlKnobs) -> str | None:
        v = release(version)
        impl = cls.host_impl(k, version)
        if impl == "engine" and k.dataset == "single-turn":
            return ("verl's engine SFTTrainer reads only MultiTurnSFTDataset (its create_sft_dataset): use "
                    "verl.dataset = 'multi-turn' or 'auto' (each sample becomes a user/assistant conversation)")
        if impl == "legacy" and v > LEGACY_SFT_LAST:
            return f"verl {version} has no legacy fsdp_sft_trainer (removed in 0.7.1): use verl.impl = 'engine'"
        if impl == "legacy" and k.dataset == "multi-turn" and v < (0, 4):
            return f"verl {version} has no MultiTurnSFTDataset (added in 0.4.0)"
        dataset: sft_data.Dataset = "multi-turn" if impl == "engine" or k.dataset == "multi-turn" else "single-turn"
        reason = sft_data.unsupported(spec, dataset)
        if reason:
            return reason
        o = spec.optimizer
        if impl == "legacy" and v < (0, 6) and (o.name != "adamw" or o.eps != 1e-8):
            return (f"verl {version}'s fsdp_sft_trainer hard-codes torch.optim.AdamW(lr, betas, weight_decay) "
                    "(build_optimizer from 0.6): optimizer.name must be 'adamw' with eps = 1e-8")
        if impl == "legacy" and v[:3] == (0, 4, 0) and k.strategy == "fsdp2" and spec.run.device == "cpu":
            return "verl 0.4.0's FSDP2 state-dict loader calls torch.cuda: on CPU use verl.strategy = 'fsdp1'"
        return None

    @classmethod
    def unsupported_knobs(cls, spec: Spec, version: str | None) -> str | None:
        k: VerlKnobs = spec.knobs_for(cls.name)
        want = {"sft": "sft", "actor": "policy", "critic": "value"}[k.path]
        if spec.loss.kind != want:
            return f"verl.path = {k.path!r} trains loss.kind = {want!r}, the spec has {spec.loss.kind!r}"
        if k.path == "sft" and spec.loss.aggregation != "token-mean":
            return "verl's SFT losses have no aggregation knob (token mean); loss.aggregation must be 'token-mean'"
        if k.path == "sft":
            reason = cls.unsupported_sft(spec, version, k)
            if reason:
                return reason
        elif k.dataset != "auto":
            return "verl.dataset chooses an SFT dataset: leave it 'auto' for the RL paths"
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
        if spec.optimizer.no_decay and spec.optimizer.weight_decay > 0:
            # verl's optimizers (workers.config.optimizer.build_optimizer, the legacy workers' AdamW) get every
            # parameter in one group: an exclusion list would be silently ignored (a decay-on-excluded divergence)
            return ("optimizer.no_decay: verl's optimizer decays every parameter (one parameter group); set "
                    "optimizer.no_decay = [] or optimizer.weight_decay = 0")
        if k.strategy == "fsdp1" and spec.batch.world_size > 1:
            return ("verl.strategy = 'fsdp1' at world size > 1: gradients cannot be read back on CPU (torch FSDP1 "
                    "unshard fails); use fsdp2")
        return None

    # ------------------------------------------------------------------------------------------------------------
    def setup(self, ctx: WorkerContext) -> None:
        set_dist_env(ctx)
        applied = cpu.install_ray_stub()
        applied += cpu.install_flash_attn_stub()
        if ctx.device == "cpu":
            os.environ["VERL_ENGINE_DEVICE"] = "cuda"  # ENGINE_REGISTRY (0.9): the lookup key only
            applied += cpu.install_cpu_platform()
        import torch
        import torch.distributed as dist

        if ctx.device == "cuda":
            torch.cuda.set_device(ctx.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(ctx.backend, rank=ctx.rank, world_size=ctx.world_size)
        import verl

        ctx.state["version"] = getattr(verl, "__version__", "unknown")
        applied += cpu.patch_attention_utils()  # 0.6.x only: it picks flash_attn.bert_padding only on CUDA
        if ctx.device == "cpu":
            applied += cpu.patch_cpu_memory_stats()
            applied += cpu.patch_fsdp1_sync_module_states()
        ctx.state["patches"] = [p.target for p in applied]

    # ------------------------------------------------------------------------------------------------------------
    def drive(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Driven:
        k: VerlKnobs = spec.knobs_for(self.name)
        version = ctx.state["version"]
        run_patches = list(ctx.state.get("patches", []))
        notes: list[str] = []
        impl = self.resolve_impl(k)
        if impl != k.impl:
            notes.append(f"impl = 'auto' resolved to {impl!r} (verl {version}'s default for this path)")
        k = dataclasses.replace(k, impl=impl)  # type: ignore[arg-type]
        if spec.optimizer.clip_grad_norm == 0:
            notes.append(f"clip_grad_norm = 0: verl has no 'off' switch, clip set to {CLIP_OFF:g} (coefficient 1)")
        if k.impl == "engine" and release(version) < (0, 7):
            raise RuntimeError(f"verl {version} has no model-engine TrainingWorker (>= 0.7); use impl = 'legacy'")
        path = importlib.import_module(f"{__package__}.{PATHS[(k.path, k.impl)]}")
        steps, extra = path.drive(spec, init_path, ctx, k, run_patches, notes)
        return Driven(steps=steps, framework_version=version,
                      code_path=f"{path.CODE_PATH} [{k.strategy}, use_remove_padding={k.use_remove_padding}]",
                      readout=READOUTS[0], patches=self.patches_applied(run_patches, k), warnings=notes, extra=extra)

    @staticmethod
    def patches_applied(run_patches: list[str], k: VerlKnobs) -> list[str]:
        """Every patch in force in this process (they persist across runs), plus the config-only ones of this run;
        FSDP1's check skip only where FSDP1 ran."""
        out = set(run_patches) | {p.target for p in cpu.APPLIED}
        if k.strategy != "fsdp1":
            out.discard(cpu.FSDP1_SYNC.target)
        return sorted(out)

    @staticmethod
    def resolve_impl(k: VerlKnobs) -> str:
        if k.impl != "auto":
            return k.impl
        if k.path == "sft":
            return "legacy" if has_module("verl.trainer.fsdp_sft_trainer") else "engine"
        if k.path == "actor":
            return "legacy" if has_module("verl.workers.actor.dp_actor") else "engine"
        return "engine"
