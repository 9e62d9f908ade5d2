"""DeepSpeed adapter: the spec's steps through DeepSpeed's own engine (code path: `engine`).

CPU patches (`cpu`, none touches the math under test): the shared-memory comm op's g++ JIT skipped (gloo
collectives instead); DeepSpeedZeroOptimizer.flatten_dense_tensors_aligned detached (0.18.7-0.18.9 + gloo + torch
2.13 at world size >= 2; 0.19.0 has the same detach upstream).
Config pins: `gradient_clipping` always explicit (its default changed 0.0 -> 1.0 in 0.19.3),
`zero_allow_untested_optimizer: true` and `zero_force_ds_cpu_optimizer: false` (a torch optimizer under offload).
"""

from __future__ import annotations

from pathlib import Path

from stepdiff.harness.spec import Spec

from ..base import Adapter, Capabilities, Driven, WorkerContext, knob_names
from ..common import set_dist_env
from . import cpu, engine
from .knobs import DeepSpeedKnobs, zero_problem


class DeepSpeedAdapter(Adapter):
    name = "deepspeed"
    version_dists = ("deepspeed",)
    conformance_knobs = {"zero_stage": 2, "offload_optimizer": "cpu"}  # the offload path, where the bugs live
    capabilities = Capabilities(
        framework="deepspeed",
        runs=engine.CODE_PATH,
        readouts=(engine.READOUT, "cross-check: SGD parameter delta / lr", "grad norm: engine.get_global_grad_norm()",
                  "loss: the fed per-micro-batch losses summed, all-reduced over ranks"),
        knobs=knob_names(DeepSpeedKnobs),
        patches=cpu.PATCHES,
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
