"""generate_text (strings in and out with an HF tokenizer) against transformers generate + decode."""
import numpy as np
import pytest

import tiny_hf
from sspo_jax import model as M
from sspo_jax import sampling
from sspo_jax.data.tokenizer import build_tokenizer

PROMPTS = ["Tom has 3 apples.", "How many apples does Tom have now? Tom has 12 apples and 5 pears."]
N_NEW = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = build_tokenizer()
    path = tmp_path_factory.mktemp("tiny_qwen2_text")
    hf = tiny_hf.make_qwen2(path, seed=3, vocab_size=len(tok))
    return tok, hf, M.from_pretrained(path)


def hf_texts(tok, hf, texts, eos_ids, pad_id):
    """transformers greedy generate on the left-padded batch; each row cut before its first EOS, then decoded."""
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert tok.padding_side == "left"
    out = hf.generate(**enc, max_new_tokens=N_NEW, do_sample=False, eos_token_id=list(eos_ids),
                      pad_token_id=pad_id)[:, enc["input_ids"].shape[1]:].tolist()
    cut = [next((i for i, t in enumerate(row) if t in eos_ids), len(row)) for row in out]
    return [tok.decode(row[:c]) for row, c in zip(out, cut)]


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_generate_text_equals_transformers(setup, template):
    tok, hf, m = setup
    texts = PROMPTS if template == "plain" else [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS]
    # An extra EOS taken from the first row's free greedy path, so that row stops early and the
    # EOS must be cut from its text; the second row runs to the budget.
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    free = hf.generate(**enc, max_new_tokens=N_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                       eos_token_id=None)[:, enc["input_ids"].shape[1]:]
    stop = int(free[0, 4])
    assert stop not in free[1].tolist(), "pick another seed: the stop token must leave row 1 running"
    eos = sampling.default_eos_ids(tok) + (stop,)
    pad = sampling.default_pad_id(tok, eos)

    ours = sampling.generate_text(m, tok, PROMPTS, template=template, max_new_tokens=N_NEW, eos_ids=eos,
                                  num_samples=2)
    assert ours[0::2] == ours[1::2] == hf_texts(tok, hf, texts, eos, pad)  # greedy: prompt-major pairs
    assert len(tok(ours[0], add_special_tokens=False)["input_ids"]) < N_NEW - 1  # the first row did stop


def test_default_eos_and_pad_ids(setup):
    tok = setup[0]
    vocab = tok.get_vocab()
    assert sampling.default_eos_ids(tok) == tuple(sorted({vocab["<|im_end|>"], vocab["<|endoftext|>"]}))
    assert sampling.default_pad_id(tok, (0, 2)) == tok.pad_token_id == vocab["<|pad|>"]
    # Qwen pads with <|endoftext|>, an EOS: the smallest id that is no EOS is used instead.
    qwen_like = build_tokenizer()
    qwen_like.pad_token = "<|endoftext|>"
    assert sampling.default_pad_id(qwen_like, (0, 2)) == 1


def test_generate_text_rejects_bad_template_and_empty_input(setup):
    tok, _, m = setup
    with pytest.raises(ValueError, match="template='chatml'"):
        sampling.generate_text(m, tok, PROMPTS, template="chatml", max_new_tokens=2)
    with pytest.raises(ValueError, match="non-empty list"):
        sampling.generate_text(m, tok, [], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"empty prompt in rows \[1\]"):
        sampling.generate_text(m, tok, ["Tom", ""], max_new_tokens=2)
