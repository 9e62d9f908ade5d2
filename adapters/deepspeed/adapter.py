"""DeepSpeed adapter: the spec's steps through DeepSpeed's own engine (code path: `engine`).

CPU patches (`cpu`, none touches the math under test): the shared-memory comm op's g++ JIT skipped (gloo
collectives instead); DeepSpeedZeroOptimizer.flatten_dense_tensors_aligned detached (0.18.7-0.18.9 + gloo + torch
2.13 at world size >= 2; 0.19.0 has the same detach upstream); py-cpuinfo's get_cpu_info memoized per worker (each
call is a ~1.1 s subprocess; DeepSpeedCPUAdam makes three; same answer, CPU and CUDA).
Optimizer: DeepSpeed's own, built from the config's `optimizer` block (DeepSpeedCPUAdam under CPU offload, FusedAdam
otherwise, both JIT-compiled once per environment into its TORCH_EXTENSIONS_DIR), unless the knob optimizer_source =
"torch" hands in a torch optimizer from outside (named so in `stepdiff list` and in every report that used it).
Config pins: `gradient_clipping` always explicit (its default changed 0.0 -> 1.0 in 0.19.3),
`zero_allow_untested_optimizer: true` and `zero_force_ds_cpu_optimizer: false` (SGD, or a handed-in torch optimizer,
under ZeRO and offload; neither changes the optimizer DeepSpeed builds for AdamW).
"""

from __future__ import annotations

from pathlib import Path

from stepdiff._util import version_tuple
from stepdiff.harness.spec import Spec

from ..base import Adapter, Capabilities, Driven, OpBuild, WorkerContext, knob_names
from ..common import set_dist_env
from . import cpu, engine
from .knobs import DeepSpeedKnobs, zero_problem


class DeepSpeedAdapter(Adapter):
    name = "deepspeed"
    version_dists = ("deepspeed",)
    conformance_knobs = {"zero_stage": 2, "offload_optimizer": "cpu"}  # the offload path, where the bugs live
    # the case picks how the optimizer is built and how accumulation is driven (not fuzzed: some pairs do not exist)
    fuzz_knobs: dict[str, tuple[object, ...]] = {"optimizer_source": (), "accumulation": (), "grad_accum_dtype": ()}
    capabilities = Capabilities(
        framework="deepspeed",
        runs=engine.CODE_PATH,
        readouts=(engine.READOUT, "cross-check: SGD parameter delta / lr", "grad norm: engine.get_global_grad_norm()",
                  "optimizer state: safe_get_full_optimizer_state (exp_avg, exp_avg_sq; gathered across partitions "
                  "and from CPU offload) and the optimizer's step counter",
                  "loss: the fed per-micro-batch losses summed, all-reduced over ranks (fed by the adapter: not "
                  "compared)"),
        knobs=knob_names(DeepSpeedKnobs),
        patches=cpu.PATCHES,
        pad_to=True,
        notes=("ZeRO-1 never reduces per micro-step, so the offload accumulation bugs need stage 2 to show.",
               "optimizer: DeepSpeed's own from the config's optimizer block by default (DeepSpeedCPUAdam under CPU "
               "offload, FusedAdam otherwise; SGD via DeepSpeed's torch fallback); optimizer_source = 'torch' hands "
               "in a torch optimizer from outside instead.",
               "float16: not on this CPU (DeepSpeed's CPU accelerator needs mkldnn fp16); bf16 end to end.",
               "accumulation = 'boundary-calls': gradient_accumulation_steps 1 and several backward() per step "
               "with set_gradient_accumulation_boundary (the GA=1 offload path)."),
    )

    @classmethod
    def requirements(cls, version: str | None) -> list[str]:
        extra = []
        if version and version_tuple(version) < (0, 14):
            extra.append("numpy<2")  # 0.13 imports numpy.BUFSIZE (gone in numpy 2, released after it)
        return [f"deepspeed=={version}" if version else "deepspeed", "transformers", *extra]

    @classmethod
    def build_env(cls, version: str | None) -> dict[str, str]:
        return {"DS_BUILD_OPS": "0"}

    @classmethod
    def ops(cls, version: str | None, spec: Spec | None = None) -> tuple[OpBuild, ...]:
        """DeepSpeed's own AdamW JIT-compiles on CPU in the first run (DeepSpeedCPUAdam under offload, FusedAdam
        otherwise): built ahead, once per environment, outside the run's timeout."""
        if spec is None:
            return (cpu.FUSED_ADAM_CPU_OP, cpu.CPU_ADAM_OP)
        k: DeepSpeedKnobs = spec.knobs_for(cls.name)
        if k.optimizer_source != "config" or spec.optimizer.name != "adamw" or spec.run.device != "cpu":
            return ()
        return (cpu.CPU_ADAM_OP,) if k.offload_optimizer != "none" else (cpu.FUSED_ADAM_CPU_OP,)

    @classmethod
    def unsupported_knobs(cls, spec: Spec, version: str | None) -> str | None:
        k: DeepSpeedKnobs = spec.knobs_for(cls.name)
        return zero_problem("deepspeed.zero_stage", k.zero_stage, "deepspeed.offload_optimizer",
                            k.offload_optimizer != "none")

    def setup(self, ctx: WorkerContext) -> None:
        cpu.select_accelerator(ctx.device)
        set_dist_env(ctx)
        import deepspeed

        ctx.state["patches"] = [p.target for p in cpu.apply(ctx.device)]
        deepspeed.init_distributed(dist_backend=ctx.backend)
        if ctx.device == "cuda":
            import torch

            torch.cuda.set_device(ctx.local_rank)

    def drive(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Driven:
        out = engine.drive(spec, init_path, ctx, spec.knobs_for(self.name))
        out.patches = list(ctx.state.get("patches", []))
        return out
