"""DeepSpeed adapter: the spec's steps through DeepSpeed's own engine.

What runs: `deepspeed.init_distributed`, `deepspeed.initialize(model, optimizer=torch SGD/AdamW, config)` and the
engine's own `forward`, `backward` (its gradient-accumulation scaling, ZeRO reduce/partition, CPU offload
accumulation) and `step` (boundary detection, unscale/clip, optimizer step, ZeRO all-gather). The adapter only feeds
micro-batches and computes the spec's loss: each micro-batch loss is sum(token CE) / (supervised tokens of the whole
step, all ranks) x grad_accum x world_size, which DeepSpeed's 1/grad_accum scaling and data-parallel averaging turn
into one global token mean when DeepSpeed is correct.

Read-outs:
- gradients: `deepspeed.utils.safe_get_full_grad(p)` after the boundary micro-batch's backward and before its
  `step()` (after accumulation, before clipping, unsharded; every rank calls it because ZeRO-3 gathers);
- cross-check with plain SGD (no momentum/decay/clipping): the parameter delta / lr, stored in
  meta.extra['readout_crosscheck_max_abs'];
- grad norm: `engine.get_global_grad_norm()` after the boundary step; loss: the per-step sum of the fed losses,
  all-reduced over ranks.

CPU patches (none touches the math under test):
- P1 `deepspeed.comm.torch.build_shm_op` -> no-op: skips an 18-77 s g++ JIT of the shared-memory comm op at
  `init_distributed`; plain gloo collectives are used instead.
- P2 `DeepSpeedZeroOptimizer.flatten_dense_tensors_aligned` -> result `.detach()`ed: 0.18.7-0.18.9 build the flat
  bit16 buffer from requires-grad params without detach, and torch 2.13's gloo all_gather_into_tensor then fails
  writing into its split views at world size >= 2 (0.19.0 adds the same detach upstream).
Config pins: `gradient_clipping` always explicit (its default changed 0.0 -> 1.0 in 0.19.3),
`zero_allow_untested_optimizer: true` and `zero_force_ds_cpu_optimizer: false` (a torch optimizer under offload).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stepdiff.harness import data as D
from stepdiff.harness.record import Record, RecordMeta, StepRecord
from stepdiff.harness.spec import Spec, doc

from . import deepspeed_cpu
from .base import (
    Adapter,
    Capabilities,
    WorkerContext,
    build_model,
    framework_versions,
    make_optimizer,
    set_dist_env,
    token_loss_sum,
)
from .deepspeed_cpu import DETACH_PATCH, SHM_PATCH


@dataclass(frozen=True)
class DeepSpeedKnobs:
    zero_stage: int = doc(2, "ZeRO stage 0-3.", minimum=0)
    offload_optimizer: Literal["none", "cpu"] = doc("none", "ZeRO optimizer-state offload device.")
    overlap_comm: bool = doc(False, "ZeRO overlap_comm.")
    contiguous_gradients: bool = doc(True, "ZeRO contiguous_gradients.")
    reduce_bucket_size: int = doc(500000, "ZeRO reduce bucket size (elements).", minimum=1)
    allgather_bucket_size: int = doc(500000, "ZeRO all-gather bucket size (elements).", minimum=1)


PATCHES = (SHM_PATCH, DETACH_PATCH)


class DeepSpeedAdapter(Adapter):
    name = "deepspeed"
    conformance_knobs = {"zero_stage": 2, "offload_optimizer": "cpu"}  # the offload path, where the bugs live
    capabilities = Capabilities(
        framework="deepspeed",
        runs="deepspeed.init_distributed + deepspeed.initialize(model, torch optimizer, config) + "
             "DeepSpeedEngine.forward/backward/step (ZeRO 0-3, offload_optimizer, overlap_comm, gradient accumulation)",
        readouts=("gradients: deepspeed.utils.safe_get_full_grad before the boundary step()",
                  "cross-check: SGD parameter delta / lr", "grad norm: engine.get_global_grad_norm()",
                  "loss: the fed per-micro-batch losses summed, all-reduced over ranks"),
        knobs=("zero_stage", "offload_optimizer", "overlap_comm", "contiguous_gradients", "reduce_bucket_size",
               "allgather_bucket_size"),
        patches=PATCHES,
        pad_to=True,
        notes=("ZeRO-1 never reduces per micro-step, so the offload accumulation bugs need stage 2 to show.",),
    )

    @classmethod
    def requirements(cls, version: str | None) -> list[str]:
        return [f"deepspeed=={version}" if version else "deepspeed", "transformers"]

    @classmethod
    def build_env(cls, version: str | None) -> dict[str, str]:
        return {"DS_BUILD_OPS": "0"}

    @classmethod
    def unsupported(cls, spec: Spec, version: str | None = None) -> str | None:
        reason = super().unsupported(spec, version)
        if reason:
            return reason
        k: DeepSpeedKnobs = spec.knobs_for(cls.name)
        if k.zero_stage > 3:
            return f"deepspeed.zero_stage = {k.zero_stage}: DeepSpeed has stages 0-3"
        if k.offload_optimizer != "none" and k.zero_stage == 0:
            return "deepspeed.offload_optimizer needs zero_stage >= 1"
        return None

    def setup(self, ctx: WorkerContext) -> None:
        if ctx.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        set_dist_env(ctx)
        import deepspeed

        applied = deepspeed_cpu.apply(ctx.device)
        deepspeed.init_distributed(dist_backend=ctx.backend)
        if ctx.device == "cuda":
            import torch

            torch.cuda.set_device(ctx.local_rank)
        ctx.state["patches"] = applied

    def config(self, spec: Spec) -> dict[str, Any]:
        k: DeepSpeedKnobs = spec.knobs_for(self.name)
        zero: dict[str, Any] = {"stage": k.zero_stage, "overlap_comm": k.overlap_comm,
                                "contiguous_gradients": k.contiguous_gradients,
                                "reduce_bucket_size": k.reduce_bucket_size,
                                "allgather_bucket_size": k.allgather_bucket_size}
        if k.offload_optimizer != "none":
            zero["offload_optimizer"] = {"device": k.offload_optimizer}
        return {
            "train_micro_batch_size_per_gpu": spec.batch.micro_batch_size,
            "gradient_accumulation_steps": spec.batch.grad_accum,
            "train_batch_size": spec.samples_per_step,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            # explicit: the default changed from 0.0 to 1.0 in 0.19.3
            "gradient_clipping": float(spec.optimizer.clip_grad_norm),
            "bf16": {"enabled": spec.model.dtype == "bfloat16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def run(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Record:
        import deepspeed
        import torch
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_grad

        t0 = time.perf_counter()
        b = spec.batch
        if ctx.world_size != b.world_size:
            raise RuntimeError(f"worker world size {ctx.world_size} != batch.world_size {b.world_size}")
        model = build_model(spec, init_path).to(ctx.torch_device)
        model.train()
        optimizer = make_optimizer(spec, model.parameters())
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config(spec))
        k: DeepSpeedKnobs = spec.knobs_for(self.name)
        names = [n for n, _ in engine.module.named_parameters()]
        smp = D.samples(spec)
        plain_sgd = (spec.optimizer.name == "sgd" and spec.optimizer.momentum == 0 and spec.optimizer.lr > 0
                     and spec.optimizer.weight_decay == 0 and spec.optimizer.clip_grad_norm == 0)
        steps: list[StepRecord] = []
        crosscheck = 0.0
        before = self._full_params(engine, k)
        for s in range(b.steps):
            n_step = D.step_token_count(spec, s)
            loss_sum = torch.zeros((), dtype=torch.float64)
            grads: dict[str, torch.Tensor] = {}
            for m in range(b.grad_accum):
                mb = D.collate(spec, D.micro_batch_indices(spec, s, ctx.rank, m), smp)
                ce_sum, _ = token_loss_sum(engine, mb, ctx.torch_device)
                loss = ce_sum / n_step * (b.grad_accum * b.world_size)
                engine.backward(loss)
                loss_sum += float(ce_sum.detach()) / n_step
                if m == b.grad_accum - 1:  # after accumulation, before the boundary step (and its clipping)
                    for name, p in engine.module.named_parameters():
                        g = safe_get_full_grad(p)
                        if g is None:
                            raise RuntimeError(f"safe_get_full_grad returned None for {name}")
                        grads[name] = g.detach().float().cpu().clone()
                engine.step()
            total = loss_sum.to(ctx.torch_device)
            if dist.is_initialized() and ctx.world_size > 1:
                dist.all_reduce(total)
            norm = engine.get_global_grad_norm()
            after = self._full_params(engine, k)
            if plain_sgd:
                for name in names:
                    delta = (before[name] - after[name]) / spec.optimizer.lr
                    crosscheck = max(crosscheck, float((delta - grads[name]).abs().max()))
            before = after
            steps.append(StepRecord(loss=float(total), grad_norm=None if norm is None else float(norm),
                                    grads=grads, params=after))
        meta = RecordMeta(
            adapter=self.name, framework_version=deepspeed.__version__, code_path=self.capabilities.runs,
            readout=self.capabilities.readouts[0], device=ctx.device, world_size=ctx.world_size,
            dtype=spec.model.dtype, versions=framework_versions("deepspeed"),
            timings={"run_s": time.perf_counter() - t0}, patches=list(ctx.state.get("patches", [])),
            extra={"ds_config": self.config(spec),
                   "readout_crosscheck_max_abs": crosscheck if plain_sgd else None},
        )
        engine.destroy() if hasattr(engine, "destroy") else None
        return Record(meta=meta, steps=steps)

    @staticmethod
    def _full_params(engine: Any, k: DeepSpeedKnobs) -> dict[str, Any]:
        """Unsharded fp32 copies of the parameters (ZeRO-3 gathers them first)."""
        import deepspeed

        params = list(engine.module.named_parameters())
        if k.zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                return {n: p.detach().float().cpu().clone() for n, p in params}
        return {n: p.detach().float().cpu().clone() for n, p in params}
