"""The files OpenRLHF's SFT path loads itself: the spec's tiny model directory with a word-level tokenizer whose ids
are the spec's token ids, and the jsonl data ordered so OpenRLHF's shuffling sampler hands each rank the spec's
micro-batches. Nothing here re-implements OpenRLHF: it only writes what OpenRLHF reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

from stepdiff.harness import data as D
from stepdiff.harness.spec import Spec

from ..common import build_model


def token_names(spec: Spec) -> list[str]:
    d = spec.data
    names = [f"t{i}" for i in range(spec.model.vocab_size)]
    names[d.pad_id], names[d.eos_id], names[d.bos_id] = "<pad>", "<eos>", "<bos>"
    return names


def write_model_dir(spec: Spec, init_path: Path, out: Path) -> None:
    """The spec's tiny Llama (shared initial weights) and a word-level tokenizer whose ids are the token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    model = build_model(spec, init_path, "float32")  # saved fp32; OpenRLHF casts to its param_dtype when loading
    model.config.eos_token_id = spec.data.eos_id
    model.config.bos_token_id = spec.data.bos_id
    model.config.pad_token_id = spec.data.pad_id
    if hasattr(model, "should_save_on_this_rank"):
        # transformers >= 5.1x writes a checkpoint only on rank 0 once a process group exists; this directory is
        # this rank's own copy, and a pooled world-size-2 worker's second run has a process group: rank 1 got a
        # directory with no config or weights (OpenRLHF 0.11.2: "Unrecognized model ... model_type").
        model.should_save_on_this_rank = lambda is_main_process: is_main_process
    model.save_pretrained(str(out), safe_serialization=True)
    if not (out / "config.json").is_file():
        raise RuntimeError(f"the model directory {out} was not written (no config.json after save_pretrained)")
    names = token_names(spec)
    tok = Tokenizer(WordLevel({n: i for i, n in enumerate(names)}, unk_token="<bos>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
                                   unk_token="<bos>")
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # not the model type's tokenizer class
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=1))


def sample_text(spec: Spec, sample: D.Sample) -> tuple[str, str]:
    """(input, output) strings that OpenRLHF's template '{} ' and whitespace tokenizer turn back into the ids."""
    names = token_names(spec)
    return " ".join(names[t] for t in sample.prompt), " ".join(names[t] for t in sample.response)


def sampler_order(spec: Spec, seed: int) -> list[int]:
    """Dataset rows such that OpenRLHF's DistributedSampler (shuffle=True, seed, epoch 0; rank r takes every
    world_size-th index of the permutation) hands rank r exactly data.rank_indices(spec, r), in order.

    rows[i] is the spec sample index written at dataset row i. The adapter verifies at run time (from the token
    ids OpenRLHF's model actually receives) that each rank saw the spec's micro-batches in order."""
    import torch

    b = spec.batch
    per_rank = [D.rank_indices(spec, r) for r in range(b.world_size)]
    n = len(per_rank[0]) * b.world_size
    wanted = [per_rank[k % b.world_size][k // b.world_size] for k in range(n)]  # sampler position k -> sample
    g = torch.Generator()
    g.manual_seed(seed)  # DistributedSampler: seed + epoch, epoch 0
    perm = torch.randperm(n, generator=g).tolist()
    rows = [-1] * n
    for k, row in enumerate(perm):
        rows[row] = wanted[k]
    return rows


def write_dataset(spec: Spec, rows: list[int], path: Path) -> None:
    smp = D.samples(spec)
    with open(path, "w") as f:
        for i in rows:
            inp, outp = sample_text(spec, smp[i])
            f.write(json.dumps({"input": inp, "output": outp}) + "\n")



def env_for_run(scratch: Path) -> None:
    """Caches of datasets/HF go to the worker's scratch, never the user's home."""
    os.environ.setdefault("HF_HOME", str(scratch / "hf_home"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(scratch / "hf_home" / "datasets"))
    os.environ.setdefault("WANDB_MODE", "disabled")
