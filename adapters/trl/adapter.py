"""TRL adapter: the spec's optimizer steps through TRL's own SFTTrainer, DPOTrainer or GRPOTrainer (code paths:
`sft`, `dpo`, `grpo`; read-outs: `capture`).

What runs: `trl.SFTTrainer` / `trl.DPOTrainer` / `trl.GRPOTrainer` `.train()`, i.e. TRL's data collator and loss,
transformers' Trainer loop (its gradient-accumulation loss scaling, `num_items_in_batch`, DDP or accelerate's
DeepSpeed integration, grad-norm, optimizer and scheduler). The adapter builds the tiny model (`build_model`), a local
WordLevel tokenizer (id i <-> token 'w{i}'), the dataset in the spec's placement, and sets every TRL/transformers
default that changes the numbers from the spec (see `common.common_args` and the trainer modules).

Patches: `common.SEQUENTIAL_SAMPLER`, `grpo.NO_SHUFFLE` (the spec's sample order), and with DeepSpeed installed its
host patches (`adapters/deepspeed/cpu.py`: the shm comm op's JIT skipped, flat buffers detached for 0.18.7-0.18.9 at
world size 2, the CUDA arch list's suffixes, py-cpuinfo memoized per worker); runs record the ones applied.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

from stepdiff._util import version_tuple
from stepdiff.harness.spec import Spec

from ..base import Adapter, Capabilities, Driven, OpBuild, WorkerContext, knob_names
from ..common import set_dist_env
from ..deepspeed import cpu as deepspeed_cpu
from ..deepspeed.knobs import zero_problem
from . import common, grpo
from .knobs import TRLKnobs

LOSS_KIND = {"sft": "sft", "dpo": "dpo", "grpo": "policy"}
"""The loss.kind each trainer trains."""


class TRLAdapter(Adapter):
    name = "trl"
    version_dists = ("trl", "accelerate", "datasets", "deepspeed")

    @classmethod
    def fuzz_knobs(cls, version: str | None, extra_pins: tuple[str, ...]) -> dict[str, tuple[object, ...]]:
        """Knob values `stepdiff fuzz` draws: the trainer follows loss.kind; DeepSpeed only when the version set
        pins it (otherwise the environment has no deepspeed)."""
        has_ds = any(p.split("==")[0].strip().lower() == "deepspeed" for p in extra_pins)
        return {"trainer": (), "deepspeed_zero_stage": (0, 1, 2) if has_ds else (),
                "offload_optimizer": ("none", "cpu") if has_ds else ()}
    capabilities = Capabilities(
        framework="trl",
        runs="trl.SFTTrainer(model, SFTConfig, pre-tokenised input_ids+completion_mask, completion_only_loss=True; "
             "trl<0.19: labels column + DataCollatorForSeq2Seq, skip_prepare_dataset).train() | "
             "trl.DPOTrainer(model, ref_model=same init, text prompt/chosen/rejected).train() | "
             "trl.GRPOTrainer(model, reward from token ids, rollout_func injecting the spec's completions).train(); "
             "transformers Trainer loop (GA scaling, num_items_in_batch, DDP gloo/nccl under torchrun, accelerate "
             "DeepSpeed ZeRO-1/2 + offload_optimizer)",
        readouts=("gradients: trainer.accelerator.clip_grad_norm_ wrapped (after accumulation and DDP all-reduce, "
                  "before clipping); DeepSpeed: DeepSpeedEngine.step wrapped, safe_get_full_grad before the boundary "
                  "step",
                  "loss: the Trainer's logged 'loss' (transformers < 5 rounds it to 4 decimals: there the same "
                  "quantity unrounded, the sum of Trainer.training_step returns per step, mean over ranks)",
                  "grad norm: the Trainer's logged grad_norm", "params: TrainerCallback.on_step_end"),
        knobs=knob_names(TRLKnobs),
        dtypes=("float32", "bfloat16"),
        optimizers=("sgd", "adamw"),
        loss_kinds=("sft", "dpo", "policy"),
        patches=(*deepspeed_cpu.PATCHES, common.SEQUENTIAL_SAMPLER, grpo.NO_SHUFFLE),
        notes=(
            "Config pinned from the spec: bf16=False (TRL defaults True), gradient_checkpointing=False, lr schedule "
            "constant with 0 warmup, optim sgd/adamw_torch (not adamw_torch_fused), max_grad_norm from the spec (off: "
            "0 on transformers>=5, 1e9 before), train_sampling_strategy=sequential, max_length=None (TRL truncates and "
            "drops rows), completion_only_loss=True (else token data trains the whole sequence), dropout 0 in the "
            "model config, shuffle_dataset=False, dataloader_num_workers=0, report_to none.",
            "World size 2: the harness's torchrun starts both ranks; accelerate runs MULTI_CPU/gloo "
            "(`accelerate launch --cpu --num_processes 2` would silently run one process, so it is not used).",
            "Gradient accumulation and DP token averaging (average_tokens_across_devices) are left at the release's "
            "defaults: that is what is under test.",
        ),
    )

    # ------------------------------------------------------------------------------------------------ environment
    @classmethod
    def requirements(cls, version: str | None) -> list[str]:
        # rich: trl 0.11/0.12 import it without declaring it; requests: trl 1.8 GRPOTrainer imports it and
        # huggingface_hub 2.x no longer brings it.
        reqs = [f"trl=={version}" if version else "trl", "rich", "requests"]
        if version and version_tuple(version) < (0, 13):
            # trl 0.11/0.12 leave datasets unbounded from below; with transformers 4.4x's huggingface_hub<1 the
            # resolver falls back to datasets 2.14, which imports pyarrow.PyExtensionType (gone in pyarrow >= 21)
            reqs.append("datasets>=3")
        return reqs

    @classmethod
    def build_env(cls, version: str | None) -> dict[str, str]:
        return {"DS_BUILD_OPS": "0"}  # when deepspeed is pinned in the version set: no op pre-build

    # ------------------------------------------------------------------------------------------------ host checks
    @classmethod
    def trainer_kind(cls, spec: Spec) -> str:
        k: TRLKnobs = spec.knobs_for(cls.name)
        if k.trainer != "auto":
            return k.trainer
        return {v: t for t, v in LOSS_KIND.items()}.get(spec.loss.kind, "?")

    @classmethod
    def trainer_module(cls, spec: Spec) -> ModuleType:
        """The code path module of the spec's trainer (stepdiff.adapters.trl.sft / dpo / grpo)."""
        return importlib.import_module(f"{__package__}.{cls.trainer_kind(spec)}")

    @classmethod
    def ops(cls, version: str | None, spec: Spec | None = None) -> tuple[OpBuild, ...]:
        """Under DeepSpeed with its own optimizer (deepspeed_optimizer = 'config'), AdamW JIT-compiles on CPU:
        DeepSpeedCPUAdam under offload, FusedAdam otherwise; built ahead, outside the run's timeout."""
        if spec is None:
            return ()
        k: TRLKnobs = spec.knobs_for(cls.name)
        if (not k.deepspeed_zero_stage or k.deepspeed_optimizer != "config" or spec.optimizer.name != "adamw"
                or spec.run.device != "cpu"):
            return ()
        return ((deepspeed_cpu.CPU_ADAM_OP,) if k.offload_optimizer != "none" else (deepspeed_cpu.FUSED_ADAM_CPU_OP,))

    @classmethod
    def unsupported_knobs(cls, spec: Spec, version: str | None) -> str | None:
        k: TRLKnobs = spec.knobs_for(cls.name)
        if LOSS_KIND.get(cls.trainer_kind(spec)) != spec.loss.kind:
            return f"trl.trainer = {k.trainer!r} does not train loss.kind = {spec.loss.kind!r}"
        o = spec.optimizer
        if o.weight_decay:
            from stepdiff.harness.model import parameter_shapes

            names = list(parameter_shapes(spec))
            ours = {n for n in names if any(re.search(x, n) for x in o.no_decay)}
            if k.deepspeed_zero_stage and k.deepspeed_optimizer == "config":
                if ours:
                    return ("optimizer.no_decay: DeepSpeed's own optimizer (trl.deepspeed_optimizer = 'config') decays "
                            "every parameter transformers hands it; set optimizer.no_decay = [] or "
                            "trl.deepspeed_optimizer = 'trainer'")
            elif ours != {n for n in names if any(re.search(x, n) for x in common.TRAINER_NO_DECAY)}:
                return ("optimizer.weight_decay > 0: the Trainer's optimizer exempts biases and norm weights from "
                        "weight decay (get_decay_parameter_names); set optimizer.no_decay = ['bias', 'norm'] to match")
        if o.name == "adamw" and o.momentum:
            return "optimizer.momentum applies to SGD only"
        zero = zero_problem("trl.deepspeed_zero_stage", k.deepspeed_zero_stage, "trl.offload_optimizer",
                            k.offload_optimizer != "none", max_stage=2, why_max="the adapter reads ZeRO-1/2 only")
        if zero:
            return zero
        if k.deepspeed_zero_stage and spec.model.dtype != "float32":
            return "trl.deepspeed_zero_stage with model.dtype != float32 is not wired (DeepSpeed bf16 mixed precision)"
        reason = cls.trainer_module(spec).unsupported(spec, k)
        return str(reason) if reason else None

    # ------------------------------------------------------------------------------------------------ worker
    def setup(self, ctx: WorkerContext) -> None:
        common.offline_env()
        applied = []
        deepspeed_cpu.select_accelerator(ctx.device)
        if importlib.util.find_spec("deepspeed") is not None:
            applied = deepspeed_cpu.apply(ctx.device)
        if ctx.device == "cuda":
            import torch

            torch.cuda.set_device(ctx.local_rank)
        ctx.state["patches"] = [p.target for p in applied]

    def drive(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Driven:
        k: TRLKnobs = spec.knobs_for(self.name)
        if k.deepspeed_zero_stage:
            if importlib.util.find_spec("deepspeed") is None:
                raise RuntimeError("trl.deepspeed_zero_stage > 0 needs deepspeed in the version set, e.g. "
                                   "-f 'trl==1.16.0,deepspeed==0.19.8'")
            set_dist_env(ctx)
        out: Driven = self.trainer_module(spec).drive(spec, init_path, ctx, k)
        out.patches = (list(ctx.state.get("patches", [])) if k.deepspeed_zero_stage else []) + out.patches
        return out
