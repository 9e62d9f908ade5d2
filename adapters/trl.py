"""TRL adapter: the spec's optimizer steps through TRL's own SFTTrainer, DPOTrainer or GRPOTrainer.

What runs: `trl.SFTTrainer` / `trl.DPOTrainer` / `trl.GRPOTrainer` `.train()`, i.e. TRL's data collator and loss,
transformers' Trainer loop (its gradient-accumulation loss scaling, `num_items_in_batch`, DDP or accelerate's
DeepSpeed integration, grad-norm, optimizer and scheduler). The adapter builds the tiny model (`build_model`), a local
WordLevel tokenizer (id i <-> token 'w{i}'), the dataset in the spec's placement, and sets every TRL/transformers
default that changes the numbers from the spec (see `trl_common.common_args` and the trainer modules).

Read-outs (instance wrappers that only copy tensors; no math is replaced):
- gradients: `trainer.accelerator.clip_grad_norm_` wrapped; it is called once per optimizer step after accumulation
  (and the DDP all-reduce) and before clipping, with clipping off too (transformers >= 5 computes the norm with
  max_grad_norm=0; older releases get max_grad_norm=1e9, whose clip coefficient clamps to exactly 1.0). Under
  DeepSpeed accelerate runs engine.step() inside the boundary backward, so `DeepSpeedEngine.step` is wrapped to
  copy `safe_get_full_grad` of every parameter before the boundary step;
- loss: the `loss` the Trainer logs (transformers >= 5); transformers 4.x rounds it to 4 decimals, so there the
  same quantity unrounded: the sum of what `Trainer.training_step` returned for the step's micro-batches (what the
  Trainer adds to tr_loss), averaged over ranks as the Trainer does; both are kept in meta.extra
  ('logged_loss', 'accumulated_loss') and a disagreement beyond rounding is a warning;
- grad norm: the `grad_norm` the Trainer logs;
- parameters: a TrainerCallback's on_step_end.
The micro-batches TRL fed (`compute_loss`'s inputs) are checked against the spec's placement on every rank: a
reordering is an error, never a silent pass.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stepdiff.harness.record import Record, RecordMeta, StepRecord
from stepdiff.harness.spec import Spec, doc

from . import deepspeed_cpu
from .base import Adapter, Capabilities, Patch, WorkerContext, framework_versions, set_dist_env
from .deepspeed_cpu import DETACH_PATCH, SHM_PATCH


@dataclass(frozen=True)
class TRLKnobs:
    trainer: Literal["auto", "sft", "dpo", "grpo"] = doc(
        "auto", "TRL trainer; auto = from loss.kind (sft -> SFTTrainer, dpo -> DPOTrainer, policy -> GRPOTrainer).")
    grpo_loss_type: Literal["auto", "grpo", "dapo", "dr_grpo", "bnpo"] = doc(
        "auto", "GRPOConfig.loss_type; auto = from loss.aggregation (seq-mean-token-mean -> grpo, token-mean -> dapo, "
        "seq-mean-token-sum-norm -> dr_grpo). bnpo (per-local-batch token mean) matches only GA = world size = 1.")
    deepspeed_zero_stage: int = doc(0, "0 = no DeepSpeed; 1-2 = accelerate's DeepSpeed integration with that ZeRO "
                                       "stage (needs deepspeed in the version set).", minimum=0)
    offload_optimizer: Literal["none", "cpu"] = doc("none", "DeepSpeed ZeRO offload_optimizer device.")
    gradient_checkpointing: bool = doc(False, "TrainingArguments.gradient_checkpointing (TRL defaults it on).")


DS_PATCHES = (SHM_PATCH, DETACH_PATCH)
SAMPLER_PATCH = Patch(
    "Trainer._get_train_sampler (instance)", "returns SequentialSampler(train_dataset) on releases without "
    "TrainingArguments.train_sampling_strategy (transformers < 5)",
    "the Trainer's RandomSampler would reorder the spec's micro-batches; the dataset is laid out in the spec's "
    "placement (ranks dealt round-robin per micro-batch, as accelerate shards batches)")
GRPO_PATCHES = (
    Patch("trl.trainer.grpo_trainer.shuffle_sequence_dict", "identity",
          "GRPOTrainer shuffles the generation batch (global torch RNG) before splitting it into micro-batches; the "
          "spec fixes the placement"),
)


def _vt(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


class TRLAdapter(Adapter):
    name = "trl"
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
        knobs=("trainer", "grpo_loss_type", "deepspeed_zero_stage", "offload_optimizer", "gradient_checkpointing"),
        dtypes=("float32", "bfloat16"),
        optimizers=("sgd", "adamw"),
        loss_kinds=("sft", "dpo", "policy"),
        patches=(*DS_PATCHES, SAMPLER_PATCH, *GRPO_PATCHES),
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
        if version and _vt(version) < (0, 13):
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
        return {"sft": "sft", "dpo": "dpo", "policy": "grpo"}.get(spec.loss.kind, "?")

    @classmethod
    def grpo_loss_type(cls, spec: Spec) -> str | None:
        k: TRLKnobs = spec.knobs_for(cls.name)
        if k.grpo_loss_type != "auto":
            return k.grpo_loss_type
        return {"seq-mean-token-mean": "grpo", "token-mean": "dapo",
                "seq-mean-token-sum-norm": "dr_grpo"}.get(spec.loss.aggregation)

    @classmethod
    def unsupported(cls, spec: Spec, version: str | None = None) -> str | None:
        reason = super().unsupported(spec, version)
        if reason:
            return reason
        k: TRLKnobs = spec.knobs_for(cls.name)
        kind = cls.trainer_kind(spec)
        want = {"sft": "sft", "dpo": "dpo", "grpo": "policy"}[kind] if kind in ("sft", "dpo", "grpo") else None
        if want != spec.loss.kind:
            return f"trl.trainer = {k.trainer!r} does not train loss.kind = {spec.loss.kind!r}"
        o = spec.optimizer
        if o.weight_decay:
            return ("optimizer.weight_decay > 0: the Trainer's optimizer exempts biases and norm weights from weight "
                    "decay, the spec decays every parameter")
        if o.name == "adamw" and o.momentum:
            return "optimizer.momentum applies to SGD only"
        if k.deepspeed_zero_stage > 2:
            return f"trl.deepspeed_zero_stage = {k.deepspeed_zero_stage}: the adapter reads ZeRO-1/2 only"
        if k.offload_optimizer != "none" and k.deepspeed_zero_stage == 0:
            return "trl.offload_optimizer needs trl.deepspeed_zero_stage >= 1"
        if k.deepspeed_zero_stage and spec.model.dtype != "float32":
            return "trl.deepspeed_zero_stage with model.dtype != float32 is not wired (DeepSpeed bf16 mixed precision)"
        if kind == "sft":
            if spec.loss.aggregation != "token-mean":
                return (f"loss.aggregation = {spec.loss.aggregation!r}: SFTTrainer's loss is a token mean "
                        "(num_items_in_batch), it has no per-sequence aggregation")
        if kind == "dpo":
            if k.deepspeed_zero_stage:
                return "DPO under DeepSpeed is not wired in the adapter"
            if spec.data.supervise != "response":
                return "data.supervise = 'all': DPOTrainer's log-probs cover the completions only"
            from stepdiff.harness import data as D

            eos = spec.data.eos_id
            for i, smp in enumerate(D.samples(spec)):
                if smp.response[-1] != eos or smp.rejected[-1] != eos:
                    return (f"data.samples[{i}]: DPOTrainer appends EOS to a completion that does not end with it; "
                            "end every response and rejected with the EOS id")
        if kind == "grpo":
            lt = cls.grpo_loss_type(spec)
            agg = spec.loss.aggregation
            match = {"grpo": "seq-mean-token-mean", "dapo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm"}
            if lt is None:
                return (f"loss.aggregation = {agg!r} has no GRPOTrainer loss_type (grpo, dapo, dr_grpo map onto the "
                        "spec)")
            if lt == "bnpo":
                if spec.batch.grad_accum * spec.batch.world_size != 1 or agg != "token-mean":
                    return ("trl.grpo_loss_type = 'bnpo' normalises by each local micro-batch's tokens: no spec "
                            "aggregation matches it unless grad_accum = world_size = 1 and token-mean")
            elif match[lt] != agg:
                return f"trl.grpo_loss_type = {lt!r} aggregates as {match[lt]!r}, the spec asks {agg!r}"
            if lt == "dr_grpo" and spec.rl.max_response_len == 0:
                return "dr_grpo divides by GRPOConfig.max_completion_length: set rl.max_response_len"
            rl = spec.rl
            if rl.group_size < 2:
                return "rl.group_size < 2: GRPOTrainer needs num_generations >= 2"
            if rl.advantage == "given":
                return ("rl.advantage = 'given': GRPOTrainer computes advantages from rewards; use group-normalized or "
                        "group-centered")
            if rl.advantage == "group-normalized" and abs(rl.advantage_eps - 1e-4) > 1e-12:
                return f"rl.advantage_eps = {rl.advantage_eps}: GRPOTrainer's std epsilon is fixed at 1e-4"
            if spec.data.supervise != "response":
                return "data.supervise = 'all': GRPO trains completion tokens only"
            if k.deepspeed_zero_stage:
                return "GRPO under DeepSpeed is not wired in the adapter"
            from stepdiff.harness import data as D

            eos = spec.data.eos_id
            for i, smp in enumerate(D.samples(spec)):
                if eos in smp.response[:-1]:
                    return (f"data.samples[{i}]: EOS before the end of the response; GRPOTrainer cuts the completion "
                            "at the first EOS")
                if smp.truncated != (smp.response[-1] != eos):
                    return (f"data.samples[{i}].truncated = {smp.truncated} but the response "
                            f"{'does not end' if smp.response[-1] != eos else 'ends'} with EOS: GRPOTrainer decides "
                            "truncation from the ids (no EOS at the end = truncated)")
        return None

    # ------------------------------------------------------------------------------------------------ worker
    def setup(self, ctx: WorkerContext) -> None:
        from .trl_common import offline_env

        offline_env()
        applied: list[str] = []
        if ctx.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if importlib.util.find_spec("deepspeed") is not None:
            applied += self._patch_deepspeed(ctx)
        if ctx.device == "cuda":
            import torch

            torch.cuda.set_device(ctx.local_rank)
        ctx.state["patches"] = applied

    @staticmethod
    def _patch_deepspeed(ctx: WorkerContext) -> list[str]:
        applied = deepspeed_cpu.apply(ctx.device)
        from .trl_common import hook_deepspeed_engine

        hook_deepspeed_engine()
        return applied

    def run(self, spec: Spec, init_path: Path, ctx: WorkerContext) -> Record:
        import trl

        t0 = time.perf_counter()
        if ctx.world_size != spec.batch.world_size:
            raise RuntimeError(f"worker world size {ctx.world_size} != batch.world_size {spec.batch.world_size}")
        k: TRLKnobs = spec.knobs_for(self.name)
        if k.deepspeed_zero_stage:
            if importlib.util.find_spec("deepspeed") is None:
                raise RuntimeError("trl.deepspeed_zero_stage > 0 needs deepspeed in the version set, e.g. "
                                   "-f 'trl==1.16.0,deepspeed==0.19.8'")
            set_dist_env(ctx)
        kind = self.trainer_kind(spec)
        module = importlib.import_module(f"stepdiff.adapters.trl_{kind}")
        out = module.run(spec, init_path, ctx, k)
        steps = [StepRecord(loss=out["losses"][s], grad_norm=out["grad_norms"][s], grads=out["grads"][s],
                            params=out["params"][s]) for s in range(spec.batch.steps)]
        patches = list(ctx.state.get("patches", [])) if k.deepspeed_zero_stage else []
        patches += out.get("patches", [])
        versions = framework_versions("trl", "accelerate", "datasets", "deepspeed")
        meta = RecordMeta(
            adapter=self.name, framework_version=trl.__version__, code_path=out["code_path"],
            readout=out["readout"], device=ctx.device, world_size=ctx.world_size, dtype=spec.model.dtype,
            versions=versions, warnings=out.get("warnings", []), timings={"run_s": time.perf_counter() - t0},
            patches=patches, extra=out.get("extra", {}),
        )
        return Record(meta=meta, steps=steps)
