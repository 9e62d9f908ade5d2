"""Samples and their fixed placement: which samples go into which micro-batch on which rank at which step.

Placement is part of the spec, not left to a framework's sampler: sample index for (step s, rank r, micro-batch m,
slot j) is ((s * world_size + r) * grad_accum + m) * micro_batch_size + j. Adapters feed their framework exactly
these micro-batches (reordering its dataset if its sampler interleaves ranks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .spec import Sample, Spec

if TYPE_CHECKING:
    import torch


def samples(spec: Spec) -> tuple[Sample, ...]:
    """The spec's samples: the explicit ones, or as many as the steps need from the seeded generator."""
    d = spec.data
    if d.samples:
        return d.samples
    rng = random.Random(d.seed)
    low, high = 3, spec.model.vocab_size  # 0, 1, 2 are pad, eos, bos
    rl = random.Random(f"{d.seed}:rl")  # RL extras from their own stream: SFT samples do not depend on them
    out = []
    prompt: tuple[int, ...] = ()
    for i in range(spec.samples_per_step * spec.batch.steps):
        p = rng.randint(*d.prompt_len)
        r = rng.randint(*d.response_len)
        response = [rng.randrange(low, high) for _ in range(r - 1 if d.append_eos else r)]
        if d.append_eos:
            response.append(d.eos_id)
        fresh = tuple(rng.randrange(low, high) for _ in range(p))
        if i % spec.rl.group_size == 0:  # GRPO groups share their prompt
            prompt = fresh
        rejected: tuple[int, ...] = ()
        if spec.loss.kind == "dpo":
            n = rl.randint(*d.response_len)
            rejected = (*[rl.randrange(low, high) for _ in range(n - 1)], d.eos_id)
        out.append(Sample(prompt=prompt, response=tuple(response), rejected=rejected,
                          advantage=round(rl.gauss(0.0, 1.0), 4), reward=float(rl.randint(0, 3)),
                          truncated=False, value_target=round(rl.gauss(0.0, 1.0), 4)))
    return tuple(out)


def sample_index(spec: Spec, step: int, rank: int, micro: int, slot: int) -> int:
    b = spec.batch
    return ((step * b.world_size + rank) * b.grad_accum + micro) * b.micro_batch_size + slot


def micro_batch_indices(spec: Spec, step: int, rank: int, micro: int) -> list[int]:
    return [sample_index(spec, step, rank, micro, j) for j in range(spec.batch.micro_batch_size)]


def rank_indices(spec: Spec, rank: int) -> list[int]:
    """Every sample rank `rank` sees, in the order it sees them (all steps)."""
    b = spec.batch
    return [i for s in range(b.steps) for m in range(b.grad_accum) for i in micro_batch_indices(spec, s, rank, m)]


def supervised_targets(spec: Spec, sample: Sample, which: str = "response") -> list[bool]:
    """For each position t >= 1 of prompt+response: is token t a supervised next-token target?

    `which="rejected"` uses the DPO rejected response instead of the response."""
    n_prompt = len(sample.prompt)
    ids = (*sample.prompt, *(sample.rejected if which == "rejected" else sample.response))
    if spec.data.supervise == "all":
        return [True] * (len(ids) - 1)
    return [t >= n_prompt for t in range(1, len(ids))]


def token_count(spec: Spec, sample: Sample) -> int:
    return sum(supervised_targets(spec, sample))


@dataclass
class MicroBatch:
    """One micro-batch as right-padded tensors.

    `loss_mask[b, t]` is 1 when `input_ids[b, t]` is a supervised target (predicted from position t-1), so the
    shifted loss uses logits[:, :-1] against input_ids[:, 1:] weighted by loss_mask[:, 1:].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    indices: list[int]

    @property
    def labels(self) -> torch.Tensor:
        """HF-style labels: input ids where supervised, -100 elsewhere (HF shifts them itself)."""
        return self.input_ids.masked_fill(self.loss_mask == 0, -100)

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def collate(spec: Spec, indices: list[int], all_samples: tuple[Sample, ...] | None = None,
            which: str = "response") -> MicroBatch:
    """Right-padded tensors of prompt+response (or prompt+rejected with which="rejected")."""
    import torch

    smp = all_samples if all_samples is not None else samples(spec)
    rows = [smp[i] for i in indices]

    def resp(s: Sample) -> tuple[int, ...]:
        return s.rejected if which == "rejected" else s.response

    length = max(spec.data.pad_to, *(len(s.prompt) + len(resp(s)) for s in rows))
    ids = torch.full((len(rows), length), spec.data.pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, s in enumerate(rows):
        seq = (*s.prompt, *resp(s))
        ids[b, : len(seq)] = torch.tensor(seq)
        attn[b, : len(seq)] = 1
        mask[b, 1 : len(seq)] = torch.tensor(supervised_targets(spec, s, which), dtype=torch.long)
    return MicroBatch(ids, attn, mask, list(indices))


def sample_advantages(spec: Spec) -> list[float]:
    """Per-sample advantages: Sample.advantage ("given"), or rewards normalised within consecutive groups of
    rl.group_size ((r - mean) / (std + eps), std with Bessel's correction as TRL and verl compute it) or centred."""
    smp = samples(spec)
    rl = spec.rl
    if rl.advantage == "given":
        return [s.advantage for s in smp]
    out = []
    g = rl.group_size
    for start in range(0, len(smp), g):
        rewards = [s.reward for s in smp[start : start + g]]
        mean = sum(rewards) / len(rewards)
        std = (sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1)) ** 0.5 if len(rewards) > 1 else 0.0
        for r in rewards:
            out.append(r - mean if rl.advantage == "group-centered" else (r - mean) / (std + rl.advantage_eps))
    return out


def included(spec: Spec, sample: Sample) -> bool:
    """Does the sample take part in the loss? (Not when it is truncated and rl.mask_truncated is set.)"""
    return not (spec.rl.mask_truncated and sample.truncated)


@dataclass(frozen=True)
class StepNorms:
    """The denominators of one optimizer step's loss under every aggregation (all micro-batches, all ranks)."""

    tokens: int
    """Supervised tokens of included samples."""
    sequences: int
    """Sequences (pairs for DPO) in the step, included or not."""
    max_response_len: int
    """rl.max_response_len, or the longest supervised response in the step."""


def step_norms(spec: Spec, step: int) -> StepNorms:
    smp = samples(spec)
    b = spec.batch
    idx = [i for r in range(b.world_size) for m in range(b.grad_accum) for i in micro_batch_indices(spec, step, r, m)]
    tokens = sum(token_count(spec, smp[i]) for i in idx if included(spec, smp[i]))
    longest = max(token_count(spec, smp[i]) for i in idx)
    return StepNorms(tokens, len(idx), spec.rl.max_response_len or longest)


def step_token_count(spec: Spec, step: int) -> int:
    """Supervised tokens in the whole optimizer step (all micro-batches, all ranks): the global-mean denominator."""
    smp = samples(spec)
    b = spec.batch
    return sum(
        token_count(spec, smp[i])
        for r in range(b.world_size)
        for m in range(b.grad_accum)
        for i in micro_batch_indices(spec, step, r, m)
    )


def microbatch_token_counts(spec: Spec, step: int) -> list[list[int]]:
    """[rank][micro] supervised token counts of one step."""
    smp = samples(spec)
    b = spec.batch
    return [
        [sum(token_count(spec, smp[i]) for i in micro_batch_indices(spec, step, r, m)) for m in range(b.grad_accum)]
        for r in range(b.world_size)
    ]
