"""The sampler's EOS and pad ids from an HF tokenizer (text in and out of the sampler is
evaluation's path: tests/test_evaluate.py checks it against transformers generate + decode)."""
from sspo_jax.data.tokenizer import build_tokenizer
from sspo_jax.generate import sampler


def test_default_eos_and_pad_ids():
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    assert sampler.default_eos_ids(tok) == tuple(sorted({vocab["<|im_end|>"], vocab["<|endoftext|>"]}))
    assert sampler.default_pad_id(tok, (0, 2)) == tok.pad_token_id == vocab["<|pad|>"]
    # Qwen pads with <|endoftext|>, an EOS: the smallest id that is no EOS is used instead.
    qwen_like = build_tokenizer()
    qwen_like.pad_token = "<|endoftext|>"
    assert sampler.default_pad_id(qwen_like, (0, 2)) == 1
