"""GRPO through trl.GRPOTrainer with injected rollouts (read-outs: `capture`).

No generation noise: `rollout_func` (TRL's own hook for custom rollouts) returns, for this rank's generation batch, the
spec's prompt and completion ids of the samples the spec places there (it checks that the prompts TRL handed it are
those samples' prompts). Truncation is what TRL itself decides from the ids (a completion whose last token is not EOS
is truncated), so the spec's `truncated` flags must agree with the ids (checked on the host). The reward function is
deterministic from token ids: a lookup of (prompt ids, completion ids) -> Sample.reward. TRL then computes the group
advantages, the truncation mask, `num_items_in_batch` and the loss itself.

Config pinned: num_generations = rl.group_size, steps_per_generation = grad_accum and num_iterations = 1 (so the old
log-probs are the current ones, ratio 1), beta = 0 (no KL, no reference model), temperature 1, loss_type from the spec
aggregation, mask_truncated_completions = rl.mask_truncated, scale_rewards group (group-normalized) or none
(group-centered), importance_sampling_level token, top_entropy_quantile 1, no vLLM, shuffle_dataset False, and
`trl.trainer.grpo_trainer.shuffle_sequence_dict` -> identity for the run (GRPOTrainer shuffles the generation batch
with the global RNG before splitting it into micro-batches).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from ..base import Driven, Patch, WorkerContext
from ..common import build_model, step_rank_indices
from ..readouts import wrapped
from . import common as C
from .capture import Capture, finish, run_trainer
from .knobs import TRLKnobs

NO_SHUFFLE = Patch("trl.trainer.grpo_trainer.shuffle_sequence_dict", "identity (during the run)",
                   "GRPOTrainer shuffles the generation batch (global torch RNG) before splitting it into "
                   "micro-batches; the spec fixes the placement")
LOSS_TYPE_AGGREGATION = {"grpo": "seq-mean-token-mean", "dapo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm"}


def loss_type(spec: Spec, k: TRLKnobs) -> str | None:
    """GRPOConfig.loss_type: the knob, or the one whose aggregation is the spec's (None: no such loss type)."""
    if k.grpo_loss_type != "auto":
        return k.grpo_loss_type
    return {agg: lt for lt, agg in LOSS_TYPE_AGGREGATION.items()}.get(spec.loss.aggregation)


def unsupported(spec: Spec, k: TRLKnobs) -> str | None:
    lt = loss_type(spec, k)
    agg = spec.loss.aggregation
    if lt is None:
        return f"loss.aggregation = {agg!r} has no GRPOTrainer loss_type (grpo, dapo, dr_grpo map onto the spec)"
    if lt == "bnpo":
        if spec.batch.grad_accum * spec.batch.world_size != 1 or agg != "token-mean":
            return ("trl.grpo_loss_type = 'bnpo' normalises by each local micro-batch's tokens: no spec "
                    "aggregation matches it unless grad_accum = world_size = 1 and token-mean")
    elif LOSS_TYPE_AGGREGATION[lt] != agg:
        return f"trl.grpo_loss_type = {lt!r} aggregates as {LOSS_TYPE_AGGREGATION[lt]!r}, the spec asks {agg!r}"
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


def placement(spec: Spec, cap: Capture) -> dict[str, list[int]]:
    smp = D.samples(spec)
    rank = cap.ctx.rank
    targets: dict[str, list[int]] = {}
    for s, m, idx, inp in cap.fed(spec, "GRPOTrainer"):
        pid, pm, cid, cm = inp["prompt_ids"], inp["prompt_mask"], inp["completion_ids"], inp["completion_mask"]
        if pid.shape[0] != len(idx):
            raise RuntimeError(f"step {s} micro-batch {m}: GRPOTrainer fed {pid.shape[0]} rows, the spec {len(idx)}")
        for row, i in enumerate(idx):
            prompt = pid[row][pm[row].bool()].tolist()
            comp = cid[row, : len(smp[i].response)].tolist()
            if prompt != list(smp[i].prompt) or comp != list(smp[i].response):
                raise RuntimeError(f"step {s} micro-batch {m} rank {rank} row {row}: GRPOTrainer fed prompt "
                                   f"{prompt} completion {comp}; the spec places sample {i} = {list(smp[i].prompt)} "
                                   f"-> {list(smp[i].response)}")
            n_p = len(smp[i].prompt)
            mk = cm[row].tolist()
            got = [n_p + j for j in range(len(smp[i].response)) if j < len(mk) and mk[j]]
            if not got and not D.included(spec, smp[i]):
                # excluded by rl.mask_truncated and masked by TRL too: no supervised target, as the spec says
                # (harness check_supervision does not yet know D.included, so it is not reported as a finding)
                cap.excluded.append(i)
                continue
            targets[str(i)] = got
    return targets


def config_request(spec: Spec, ctx: WorkerContext, knobs: TRLKnobs, trainer_cls: Any) -> dict[str, Any]:
    """GRPOConfig's keyword arguments from the spec."""
    lt = loss_type(spec, knobs)
    b, rl = spec.batch, spec.rl
    n_total = spec.samples_per_step * b.steps
    longest = max(len(s.response) for s in D.samples(spec)[:n_total])
    max_len = rl.max_response_len or longest
    args = C.common_args(spec, ctx, str(ctx.scratch / "grpo"), trainer_cls, None, knobs.gradient_checkpointing)
    grpo = dict(num_generations=rl.group_size, steps_per_generation=b.grad_accum, generation_batch_size=None,
                num_iterations=1, beta=0.0, loss_type=lt, mask_truncated_completions=rl.mask_truncated,
                scale_rewards="none" if rl.advantage == "group-centered" else "group",
                temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
                max_completion_length=max_len, max_prompt_length=None,
                epsilon=rl.clip_ratio_low, epsilon_high=rl.clip_ratio_high, delta=None,
                importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                use_vllm=False, vllm_importance_sampling_correction=False, use_liger_kernel=False,
                use_liger_loss=False, shuffle_dataset=False, disable_dropout=True, log_completions=False,
                reward_weights=None, multi_objective_aggregation="sum_then_normalize", remove_unused_columns=False,
                cast_lm_head_to_fp32=False, sync_ref_model=False, ds3_gather_for_generation=True)
    return {**args, **grpo}


def drive(spec: Spec, init_path: Path, ctx: WorkerContext, knobs: TRLKnobs) -> Driven:
    import datasets
    import transformers
    import trl
    from transformers import Trainer
    from trl import GRPOConfig, GRPOTrainer
    smp = D.samples(spec)
    tok = C.build_tokenizer(spec)
    notes: list[str] = []
    b, rl = spec.batch, spec.rl
    g = rl.group_size
    # one dataset row per group (RepeatSampler repeats it num_generations times), in the spec's sample order
    n_total = spec.samples_per_step * b.steps
    rows = [{"prompt": C.ids_to_text(smp[start].prompt, spec)} for start in range(0, n_total, g)]
    ds = datasets.Dataset.from_list(rows)
    rewards: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}
    for i in range(n_total):
        key = (tuple(smp[i].prompt), tuple(smp[i].response))
        if key in rewards and rewards[key] != smp[i].reward:
            raise RuntimeError(f"samples with identical prompt and completion ids have different rewards ({key})")
        rewards[key] = smp[i].reward
    calls = {"n": 0}

    def rollout_func(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        s = calls["n"]
        calls["n"] += 1
        idx = step_rank_indices(spec, s, ctx.rank)
        want = [C.ids_to_text(smp[i].prompt, spec) for i in idx]
        if list(prompts) != want:
            raise RuntimeError(f"GRPOTrainer handed rank {ctx.rank} the prompts {list(prompts)} at generation {s}; "
                               f"the spec places samples {idx} there (prompts {want})")
        return {"prompt_ids": [list(smp[i].prompt) for i in idx],
                "completion_ids": [list(smp[i].response) for i in idx], "logprobs": None}

    def token_reward(prompts: Any = None, completions: Any = None, completion_ids: Any = None, **kw: Any) -> list:
        out = []
        for p, c in zip(prompts, completion_ids, strict=True):
            ids = tuple(tok.convert_tokens_to_ids(p.split()))
            key = (ids, tuple(int(t) for t in c))
            if key not in rewards:
                raise RuntimeError(f"reward lookup: no spec sample with prompt {ids} and completion {key[1]}")
            out.append(float(rewards[key]))
        return out

    token_reward.__name__ = "spec_reward"
    lt = loss_type(spec, knobs)
    absent: dict[str, str] = {}
    cfg, kwargs = C.trainer_config(GRPOConfig, config_request(spec, ctx, knobs, Trainer), absent)
    model = build_model(spec, init_path).to(ctx.torch_device)
    model.train()
    cap = Capture(ctx)
    if "rollout_func" not in inspect.signature(GRPOTrainer.__init__).parameters:
        raise RuntimeError(f"trl {trl.__version__} GRPOTrainer has no rollout_func: rollouts cannot be injected")
    trainer = GRPOTrainer(**C.trainer_kwargs(spec, model, tok, GRPOTrainer, notes, reward_funcs=[token_reward],
                                             args=cfg, train_dataset=ds, rollout_func=rollout_func,
                                             callbacks=cap.callbacks()))
    with wrapped(importlib.import_module("trl.trainer.grpo_trainer"), "shuffle_sequence_dict", lambda _: lambda d: d):
        run_trainer(trainer, cap, deepspeed=False)
    targets = placement(spec, cap)
    adv_spec = D.sample_advantages(spec)
    adv_trl = {}
    for (s, m), inp in zip([(s, m) for s in range(b.steps) for m in range(b.grad_accum)], cap.micro_inputs,
                           strict=False):
        a = inp.get("advantages")
        if a is not None:
            for row, i in enumerate(D.micro_batch_indices(spec, s, ctx.rank, m)):
                adv_trl[str(i)] = float(a.reshape(a.shape[0], -1)[row, 0])
    adv_err = max((abs(v - adv_spec[int(i)]) for i, v in adv_trl.items()), default=None)
    extra = {"trainer": "GRPOTrainer", "loss_type": lt,
             "config": {k: v for k, v in kwargs.items() if k != "output_dir"}, "advantages_trl": adv_trl,
             "masked_truncated_samples": cap.excluded, "absent_config_fields": absent,
             "advantages_max_abs_error_vs_spec": adv_err}
    code_path = (f"trl.GRPOTrainer.train (trl {trl.__version__}, transformers {transformers.__version__}, "
                 f"loss_type={lt}, rollout_func injection)")
    return finish(spec, cap, trainer, notes, [NO_SHUFFLE.target], extra, code_path, targets)
