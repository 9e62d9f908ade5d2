"""Shared by the bare scripts (no stepdiff import): the tiny Llama config and seeded token ids of the bundled
deepspeed-zero2-offload-ga4 case. A person checking a framework by hand would write about this much."""

from __future__ import annotations

import argparse
import random
import time

T0 = time.perf_counter()


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--offload", default="cpu", choices=["none", "cpu"])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", help="save the step's gradients here (safetensors)")
    return ap.parse_args()


def samples(args: argparse.Namespace) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) token ids; ids 0-2 are pad/eos/bos; the response ends with EOS."""
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.grad_accum):
        prompt = [rng.randrange(3, args.vocab) for _ in range(rng.randint(2, 8))]
        response = [rng.randrange(3, args.vocab) for _ in range(rng.randint(1, 15))] + [1]
        out.append((prompt, response))
    return out


def model(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=256, attention_dropout=0.0, use_cache=False, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def batch(prompt: list[int], response: list[int]):  # type: ignore[no-untyped-def]
    """input ids and labels (-100 on the prompt), one sample."""
    import torch

    ids = torch.tensor([prompt + response])
    labels = torch.tensor([[-100] * len(prompt) + response])
    return ids, labels


def token_loss(m, ids, labels):  # type: ignore[no-untyped-def]
    """Sum of response-token cross-entropy (next-token targets) and its count."""
    import torch

    logits = m(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="sum")
    return ce, int((target != -100).sum())


def done(name: str, loss: float, grads: dict, out: str | None) -> None:  # type: ignore[type-arg]
    if out:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in grads.items()}, out)
    print(f"{name}: loss {loss:.6f} in {time.perf_counter() - T0:.2f} s (after interpreter start)")
