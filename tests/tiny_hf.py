"""Tiny random Hugging Face Qwen2 checkpoints for tests: the independent reference.

`transformers` builds and saves the model, so the JAX side only ever sees files on disk, exactly
as a user's checkpoint. Nothing is downloaded.
"""
from __future__ import annotations

import os

import torch
import transformers

# Small but structurally complete: GQA (4 query heads over 2 kv heads), q/k/v biases, odd vocab.
BASE = dict(
    vocab_size=131,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def hf_and_flax(out_dir: str | os.PathLike, seed: int = 0):
    """(transformers model, the project's model loaded from its files): the pair the sampler and
    engine tests compare."""
    from sspo_jax import model as M
    hf = make_qwen2(out_dir, seed=seed)
    return hf, M.from_pretrained(out_dir)


def make_qwen2(out_dir: str | os.PathLike, seed: int = 0, dtype=torch.float32, **overrides):
    """Builds a random `Qwen2ForCausalLM`, saves it as safetensors in `out_dir`, returns the model.

    Weights are drawn with std 0.1 (larger than HF's 0.02 init) and the q/k/v biases are made
    non-zero, so that every parameter visibly moves the logits and a wrong port cannot hide.
    """
    kwargs = {**BASE, **overrides}
    config = transformers.Qwen2Config(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        for layer in model.model.layers:  # RMSNorm weights around 1, as in trained models
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    model = model.to(dtype).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def left_padded_batch(lengths, vocab_size: int, total: int | None = None, seed: int = 0, pad_id: int = 0):
    """Random token ids, left padded to `total` (default: the longest). Returns (ids, mask) int64 tensors."""
    gen = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    ids = torch.full((len(lengths), total), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), total), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = torch.randint(1, vocab_size, (n,), generator=gen)
        mask[row, total - n:] = 1
    return ids, mask


def reference_logits(model, ids, mask):
    """float32 numpy logits [B, T, V] of the transformers model on a left-padded batch.

    position_ids follow the project's convention (docs/design.md): a token's position is the
    number of real tokens before it in its row (transformers would otherwise count the pads).
    """
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    return out.logits.float().numpy()
