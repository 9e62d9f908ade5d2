"""OpenRLHF adapter: the spec's SFT steps through OpenRLHF's own `openrlhf.cli.train_sft` (code path: `sft`).

Environment (`env`): `openrlhf` installed --no-deps, plus the release's own deepspeed and transformers pins and the
SFT path's imports (peft, torchdata, datasets, pylatexenc, sympy, einops); flash-attn from its sdist without kernels.
Not installed: vllm, ray (imported only, before 0.10), wandb, bitsandbytes, optimum, liger-kernel, ring-flash-attn.
Patches (`cpu`): CPU glue only, each listed by `stepdiff list`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from ..base import Adapter, Capabilities, Driven, OpBuild, WorkerContext, knob_names
from ..common import set_dist_env
from ..deepspeed import cpu as deepspeed_cpu
from ..deepspeed.knobs import zero_problem
from . import cpu, env, fixture, sft
from .knobs import OpenRLHFKnobs

NOT_PPO = ("PPO actor/critic (issue item 7) is not driven yet: OpenRLHF's PPO steps live in openrlhf.trainer.ray "
           "(ActorPPOTrainer.training_step(experience) / CriticPPOTrainer), built inside Ray actors "
           "(PolicyModelActor/CriticModelActor) with experiences from vLLM or HF generation. ActorPPOTrainer is a "
           "plain class, so an injected-Experience drive without starting Ray looks possible, but its module "
           "imports ray, "
           "and it needs the Ray launcher's args tree and a hand-built Experience: not done in this iteration "
           "(loss.kind = policy/value is reported unsupported).",)


OPENRLHF_NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")
"""openrlhf.utils.deepspeed.deepspeed_utils.get_optimizer_grouped_parameters' no_decay_name_list (substrings)."""


class OpenRLHFAdapter(Adapter):
    name = "openrlhf"
    version_dists = ("openrlhf", "deepspeed", "flash-attn", "datasets", "peft")
    capabilities = Capabilities(
        framework="openrlhf",
        runs=sft.CODE_PATH,
        readouts=sft.READOUTS,
        knobs=knob_names(OpenRLHFKnobs),
        devices=("cpu", "cuda"),
        world_sizes="1, 2, ... (torchrun; gloo on CPU, nccl on CUDA)",
        dtypes=("float32", "bfloat16"),
        optimizers=("adamw",),
        loss_kinds=("sft",),
        patches=cpu.PATCHES,
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
    # `stepdiff fuzz` never draws the black-box read-out: it needs a large eps to be well conditioned
    fuzz_knobs: dict[str, tuple[object, ...]] = {"readout": ()}
    conformance_optimizer = {"name": "adamw", "lr": 1.0, "eps": 1.0}

    # ---------------------------------------------------------------------------------------------------------
    # Environment

    @classmethod
    def requirements(cls, version: str | None) -> list[str]:
        ds, tf, _ = env.release_pins(version)
        extra = ["ray"] if env.imports_ray_on_sft_path(version) else []
        return [ds, tf, *env.SFT_PATH_PACKAGES, *extra]

    @classmethod
    def install_steps(cls, version: str | None) -> list[list[str]]:
        _, _, fa = env.release_pins(version)
        return [["--no-deps", f"openrlhf=={version}" if version else "openrlhf"],
                ["--no-deps", "--no-build-isolation", fa]]

    @classmethod
    def build_env(cls, version: str | None) -> dict[str, str]:
        return {"DS_BUILD_OPS": "0", "FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE", "FLASH_ATTENTION_FORCE_BUILD": "TRUE"}

    @classmethod
    def ops(cls, version: str | None, spec: Spec | None = None) -> tuple[OpBuild, ...]:
        """With adam_impl = 'deepspeed' on CPU, DeepSpeed JIT-compiles its Adam op in the first run: FusedAdam's
        (no offload) or DeepSpeedCPUAdam's (adam_offload). Built ahead, outside the run's timeout."""
        if spec is None:
            return (deepspeed_cpu.FUSED_ADAM_CPU_OP, deepspeed_cpu.CPU_ADAM_OP)
        k: OpenRLHFKnobs = spec.knobs_for(cls.name)
        if k.adam_impl != "deepspeed" or spec.run.device != "cpu":
            return ()
        return (deepspeed_cpu.CPU_ADAM_OP,) if k.adam_offload else (deepspeed_cpu.FUSED_ADAM_CPU_OP,)

    # ---------------------------------------------------------------------------------------------------------
    # What the CLI can express

    @classmethod
    def unsupported_knobs(cls, spec: Spec, version: str | None) -> str | None:
        k: OpenRLHFKnobs = spec.knobs_for(cls.name)
        o, d = spec.optimizer, spec.data
        zero = zero_problem("openrlhf.zero_stage", k.zero_stage, "openrlhf.adam_offload", k.adam_offload)
        if zero:
            return zero
        if o.weight_decay > 0:
            from stepdiff.harness.model import parameter_shapes

            names = list(parameter_shapes(spec))
            theirs = {n for n in names if any(x in n for x in OPENRLHF_NO_DECAY)}
            ours = {n for n in names if any(re.search(x, n) for x in o.no_decay)}
            if theirs != ours:
                return ("optimizer.weight_decay > 0: OpenRLHF exempts " + ", ".join(sorted(theirs)[:3])
                        + (", ..." if len(theirs) > 3 else "") + " from decay (get_optimizer_grouped_parameters: "
                        "names containing " + ", ".join(OPENRLHF_NO_DECAY) + "); set optimizer.no_decay = "
                        "['bias', 'norm.weight'] to match")
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
        deepspeed_cpu.select_accelerator(ctx.device)
        set_dist_env(ctx)
        fixture.env_for_run(ctx.scratch)
        ctx.state["torch_extensions"] = os.environ.get("TORCH_EXTENSIONS_DIR")
        ctx.state["patches"] = [p.target for p in cpu.apply_cpu_patches(ctx.device)]
        ctx.state["runs"] = 0

    def drive(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Driven:
        return sft.drive(spec, init_path, ctx, spec.knobs_for(self.name))
