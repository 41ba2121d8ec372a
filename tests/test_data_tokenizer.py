"""The project's small tokenizer: exact round trips, fixed ids, special tokens, HF save/load (plain
AutoTokenizer too, beside a Qwen2 config)."""
import pytest
from transformers import AutoTokenizer

from sspo_jax.data import synthetic
from sspo_jax.data import tokenizer as tok
from sspo_jax.data.templates import render_prompt


@pytest.fixture(scope="module")
def tokenizer():
    return tok.build_tokenizer()


def test_synthetic_problems_solutions_and_prompts_round_trip_exactly(tokenizer):
    rows = synthetic.generate(300, levels=tuple(synthetic.LEVELS), seed=0)
    rows += synthetic.generate(100, split="test", levels=tuple(synthetic.LEVELS), seed=0)
    for row in rows:
        texts = [row["problem"], row["solution"], row["solution"] + "<|im_end|>"]
        texts += [render_prompt(row["problem"], t, tokenizer) for t in ("qwen25-math-cot", "plain", "chat")]
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, text
            assert tokenizer.decode(ids) == text


def test_words_digits_and_delimiters(tokenizer):
    """Qwen2's pre-tokenization: digits one by one, a space before a number its own token, words
    with their leading space, punctuation runs (`.` + newline) as one token."""
    text = "Tom has 12 pens. 12 + 305 = 317.\nThe answer is \\boxed{317}."
    ids = tokenizer(text)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces == ["Tom", " has", " ", "1", "2", " pens", ".", " ", "1", "2", " +", " ", "3", "0",
                      "5", " =", " ", "3", "1", "7", ".\n", "The", " answer", " is", " \\", "boxed",
                      "{", "3", "1", "7", "}."]
    for delimiter in (".", ",", "?", ":", "\n"):
        assert len(tokenizer(delimiter)["input_ids"]) == 1


def test_special_tokens_and_fixed_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids(list(tok.SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == ("<|im_end|>", "<|pad|>", "<|unk|>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.bos_token is None
    assert tokenizer.padding_side == "left"
    assert tok.build_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic
    tok._trained.cache_clear()
    assert tok.build_tokenizer().get_vocab() == tokenizer.get_vocab()  # trained again: the same
    ids = tokenizer("Tom has 2 pens.<|im_end|>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Tom has 2 pens."


def test_unknown_words_become_byte_pieces(tokenizer):
    text = "Tom has 3 zebras and 2 ünïcödé ☃."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text


def test_save_and_load_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    problem = "Anna has 4 coins. Anna loses 1. How many coins does Anna have now?"
    text = render_prompt(problem, "chat", loaded)
    assert text == render_prompt(problem, "chat", tokenizer)
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.padding_side) == (2, 3, "left")


def test_beside_a_qwen2_config_plain_auto_tokenizer_gives_the_same_ids(tmp_path):
    """transformers 5 loads a qwen2 model directory's tokenizer as Qwen2Tokenizer, rebuilt from
    vocab and merges with Qwen2's pre-tokenizer: with this tokenizer's design, the same ids (an
    exported demo model works in plain transformers); load_tokenizer agrees."""
    import json

    from sspo_jax.data.tokenizer import build_tokenizer, load_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, f)
    text = render_prompt("Anna has 8 eggs. Anna finds 9 more. How many eggs?", "qwen25-math-cot")
    text += "8 + 9 = 17.\nThe answer is \\boxed{17}.<|im_end|>"
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
        assert len(loaded) == len(tok)
    assert type(AutoTokenizer.from_pretrained(tmp_path)).__name__ == "Qwen2Tokenizer"
