"""The model every run trains: a Llama-like causal LM defined by a transformers `LlamaConfig` dict.

The harness writes the seeded initial weights once per spec (pure torch, no transformers: the init does not depend
on any library's init code), under the canonical Hugging Face parameter names. Every worker builds the model from the
same config and loads this file strictly, so a missing or extra parameter fails loudly.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .spec import ModelSpec, Spec

# Real-size shapes by name for the GPU path (random init from a config; never a hub download).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-160m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                       num_kv_heads=12),
    # ~0.47B: the size of the small open models people fine-tune (Qwen2.5-0.5B, Llama-3.2-class shapes)
    "llama-0.5b": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                       num_kv_heads=8),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                     num_kv_heads=8),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                     num_kv_heads=8),
}


def shape_of(m: ModelSpec) -> dict[str, Any]:
    base = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads)
    if m.preset != "tiny":
        base.update(PRESETS[m.preset])
    return base


def hf_config(spec: Spec) -> dict[str, Any]:
    """The `LlamaConfig` keyword arguments of the spec's model (dropout 0, attention kernel fixed)."""
    m, d = spec.model, spec.data
    s = shape_of(m)
    return dict(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings, attention_dropout=0.0, classifier_dropout=0.0, hidden_act="silu",
        use_cache=False,
        pad_token_id=d.pad_id, eos_token_id=d.eos_id, bos_token_id=d.bos_id, attention_bias=False, mlp_bias=False,
    )


def parameter_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names and shapes, in the model's registration order."""
    s = shape_of(spec.model)
    h, inter, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    hd = h // s["num_heads"]
    kv = hd * s["num_kv_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(s["num_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.mlp.gate_proj.weight": (inter, h), f"{p}.mlp.up_proj.weight": (inter, h),
            f"{p}.mlp.down_proj.weight": (h, inter),
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    if spec.loss.kind == "value":  # a value model: LlamaForTokenClassification(num_labels=1), head named `score`
        shapes["score.weight"] = (1, h)
        shapes["score.bias"] = (1,)
    elif not spec.model.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def init_fingerprint(spec: Spec) -> str:
    key = json.dumps({"shapes": parameter_shapes(spec), "seed": spec.model.seed, "std": spec.model.init_std,
                      "v": 1}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def write_init_weights(spec: Spec, directory: Path) -> Path:
    """Write (once; cached by fingerprint) the seeded fp32 initial weights; return the safetensors path.

    Norm weights start at 1 plus small noise so that their gradients are not degenerate; each tensor gets its own
    generator seeded from (seed, name) so adding a layer does not shift the others.
    """
    import torch
    from safetensors.torch import save_file

    path = directory / f"init-{init_fingerprint(spec)}.safetensors"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, shape in parameter_shapes(spec).items():
        seed = int(hashlib.sha256(f"{spec.model.seed}:{name}".encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.1 * t
        else:
            tensors[name] = spec.model.init_std * t
    # a temporary name unique to this writer: concurrent runs of the same spec write the same content, and each
    # must publish a complete file (os.replace is atomic), never half of another's
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
