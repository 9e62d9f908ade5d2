"""The files verl's SFT datasets read, written by stepdiff, and the check that verl read them back as the spec says.

- A tokenizer whose ids ARE the spec's token ids: one character per id (a `tokenizers` WordLevel model over
  single characters, wrapped in `PreTrainedTokenizerFast`), pad/eos/bos = the spec's ids, a chat template that
  concatenates the message contents (so a conversation tokenises to exactly its messages' ids), saved into the model
  directory verl loads (`hf_tokenizer(model_path)`). No hub download.
- The spec's samples as a parquet file: `single-turn` = `prompt` / `response` text columns for `SFTDataset` (which
  appends the tokenizer's EOS to the response itself, so the response is written without its final EOS);
  `multi-turn` = a `messages` list (user: prompt, assistant: response) for `MultiTurnSFTDataset`.
- The row order: verl's SFT trainers deal rows with `DistributedSampler(shuffle=True, seed=0)`; rows are written so
  that its permutation hands every rank the spec's samples in the spec's order (placement is part of the spec).
- `check_rows`: the token ids verl's dataloader produced for a step on this rank must be the spec's samples there.
  A tokenizer, ordering or dataset surprise is then an error, never a silently different test. `fit_batches`: the
  SFT trainers' own dataloader as their `fit` walks it, every batch checked so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from ..common import step_rank_indices

Dataset = Literal["single-turn", "multi-turn"]

CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
"""Message contents back to back: a conversation's ids are its messages' ids, nothing added."""
SAMPLER_SEED = 0
"""DistributedSampler's default seed, which verl's SFT trainers do not set."""
_PLANE_15, _PLANE_16, _PLANE_SIZE = 0xF0000, 0x100000, 0xFFFE
MAX_VOCAB = 2 * _PLANE_SIZE
"""Ids map to private-use characters (never whitespace, never normalised): planes 15 and 16."""


def char(token_id: int) -> str:
    """The character that stands for one token id."""
    if token_id < _PLANE_SIZE:
        return chr(_PLANE_15 + token_id)
    return chr(_PLANE_16 + token_id - _PLANE_SIZE)


def text(ids: tuple[int, ...] | list[int]) -> str:
    return "".join(char(i) for i in ids)


def write_tokenizer(spec: Spec, directory: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = spec.data
    vocab = {char(i): i for i in range(spec.model.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=char(d.pad_id)))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=char(d.pad_id), eos_token=char(d.eos_id),
                                   bos_token=char(d.bos_id), chat_template=CHAT_TEMPLATE,
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(directory))


def row_order(spec: Spec) -> list[int]:
    """rows[r] = the spec sample written as parquet row r, so that DistributedSampler(shuffle=True, seed=0,
    drop_last=True) over world_size ranks, batched by samples_per_step / world_size, gives rank k's step s the
    spec's samples of (s, k) in order."""
    import torch

    b = spec.batch
    n = spec.samples_per_step * b.steps
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SAMPLER_SEED)).tolist()
    rows = [-1] * n
    for s in range(b.steps):
        for r in range(b.world_size):
            for k, i in enumerate(step_rank_indices(spec, s, r)):
                position = s * (n // (b.steps * b.world_size)) + k  # this rank's k-th sample of step s
                rows[perm[r + position * b.world_size]] = i
    return rows


def write_parquet(spec: Spec, path: Path, dataset: Dataset) -> Path:
    import pandas as pd

    smp = D.samples(spec)
    records: list[dict[str, object]] = []
    for i in row_order(spec):
        s = smp[i]
        if dataset == "single-turn":  # SFTDataset appends tokenizer.eos_token to the response
            records.append({"prompt": text(s.prompt), "response": text(s.response[:-1])})
        else:
            records.append({"messages": [{"role": "user", "content": text(s.prompt)},
                                         {"role": "assistant", "content": text(s.response)}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_parquet(path)
    return path


def max_length(spec: Spec) -> int:
    """verl's data.max_length: the longest sample (the datasets right-pad to it; truncation stays 'error')."""
    smp = D.samples(spec)
    return max(len(smp[i].prompt) + len(smp[i].response) for i in range(spec.samples_per_step * spec.batch.steps))


def check_rows(spec: Spec, step: int, rank: int, rows: list[list[int]]) -> None:
    """`rows` are the unpadded token ids verl's dataloader gave this rank for optimizer step `step`."""
    smp = D.samples(spec)
    want = [[*smp[i].prompt, *smp[i].response] for i in step_rank_indices(spec, step, rank)]
    if rows != want:
        bad = next(j for j in range(max(len(rows), len(want)))
                   if j >= len(rows) or j >= len(want) or rows[j] != want[j])
        got = rows[bad] if bad < len(rows) else None
        expected = want[bad] if bad < len(want) else None
        raise RuntimeError(f"verl's SFT dataloader gave rank {rank} step {step} row {bad} = {got}, the spec places "
                           f"{expected} there (tokenizer, dataset or sampler order differs)")


def fit_batches(spec: Spec, trainer: Any, rank: int, rows: Callable[[Any], list[list[int]]]) -> Iterator[Any]:
    """The batches an SFT trainer's `fit` steps through, for the spec's steps: `train_sampler.set_epoch(0)`, then
    the trainer's own `train_dataloader`, each batch's rows (`rows(batch)`: unpadded token ids) checked against the
    spec's placement on this rank. Fewer batches than the spec's steps is an error."""
    trainer.train_sampler.set_epoch(epoch=0)
    given = 0
    for s, batch in enumerate(trainer.train_dataloader):
        if s == spec.batch.steps:
            break
        check_rows(spec, s, rank, rows(batch))
        given += 1
        yield batch
    if given != spec.batch.steps:
        raise RuntimeError(f"verl's train_dataloader gave {given} batches, the spec takes {spec.batch.steps} steps")


def unsupported(spec: Spec, dataset: Dataset) -> str | None:
    """Why verl's SFT datasets cannot carry this spec's samples as they are, or None."""
    if spec.data.supervise != "response":
        return ("verl's SFT datasets train the response (assistant) tokens only: data.supervise must be "
                "'response'")
    if spec.model.vocab_size > MAX_VOCAB:
        return f"model.vocab_size {spec.model.vocab_size} exceeds the {MAX_VOCAB} ids the local tokenizer can carry"
    smp = D.samples(spec)[: spec.samples_per_step * spec.batch.steps]
    if any(not s.prompt for s in smp):
        return "verl's SFT datasets need a non-empty prompt (user message) in every sample"
    if dataset == "single-turn" and any(s.response[-1] != spec.data.eos_id for s in smp):
        return ("verl's SFTDataset appends EOS to every response: each response must end with data.eos_id "
                "(data.append_eos = true), or use verl.dataset = 'multi-turn'")
    return None
