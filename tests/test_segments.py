"""Subsentence tables and segment ids, against a plain string splitter and a loop reference."""
import jax
import loss_reference as ref
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sspo_jax.rl import segments

SAMPLES = [
    "First, compute 3.14 times 2. Then add 5; the result is 11.28!",
    "Is x = 0.5 or 1.25? We check: both work.\nSo the answer is 2.",
    "答案是，三。好！再算一次：四？",
    "No delimiter at all here",
    "Step 1: 12.5 plus 7.5 is 20.\nStep 2: halve it, get 10.\n",
]


@pytest.fixture(scope="module")
def bpe():
    """A real byte-level BPE tokenizer (GPT-2/Qwen style), trained on the samples."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLES * 3, trainer)
    return tok


def split_text(text, delimiters=segments.DEFAULT_DELIMITERS):
    """The spec's rule on characters: a delimiter ends a subsentence, a '.' before a digit
    does not, the tail is one more subsentence."""
    pieces, current = [], ""
    for i, ch in enumerate(text):
        current += ch
        decimal_point = ch == "." and i + 1 < len(text) and text[i + 1].isdecimal()
        if ch in delimiters and not decimal_point:
            pieces.append(current)
            current = ""
    return pieces + [current]


def test_bpe_segment_ids_match_string_splitting(bpe):
    eos = bpe.token_to_id("<eos>")
    ends = segments.ends_table(bpe)
    dot_end, digit_start = segments.decimal_guard_tables(bpe)
    rows = [bpe.encode(s).ids + [eos] for s in SAMPLES]
    T = max(map(len, rows)) + 3
    tokens = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, True
    seg = jax.jit(lambda t, m: segments.segment_ids(t, m, ends, dot_end=dot_end,
                                                    digit_start=digit_start))(tokens, mask)
    seg = np.asarray(seg)
    for i, text in enumerate(SAMPLES):
        ids = seg[i][mask[i]]
        assert np.all(np.diff(ids) >= 0) and ids[0] == i * T
        got = [bpe.decode(tokens[i][mask[i]][ids == k].tolist()) for k in np.unique(ids)]
        assert got == split_text(text), text


def test_transformers_wrapper_and_vocab_padding(bpe):
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    raw = segments.ends_table(bpe)
    wrapped = segments.ends_table(hf, vocab_size=len(hf) + 5)
    assert wrapped.dtype == bool and wrapped.shape == (len(hf) + 5,)
    np.testing.assert_array_equal(wrapped[:len(hf)], raw)
    assert not wrapped[len(hf):].any() and not raw[bpe.token_to_id("<eos>")]
    for text, is_end in ((",", True), ("。", True), ("!", True), ("\n", True), ("x", False)):
        assert raw[bpe.token_to_id(bpe.encode(text).tokens[0])] == is_end, text
    assert raw.sum() > 0 and not raw.all()
    dot_end, digit_start = segments.decimal_guard_tables(hf)
    assert dot_end[bpe.token_to_id(".")] and not dot_end[bpe.token_to_id(",")]
    assert digit_start[bpe.encode("3").ids[0]] and not digit_start[bpe.encode(" 5").ids[0]]


def test_multibyte_delimiter_split_over_byte_tokens_is_not_an_end():
    """The documented limit: with no merges, '。' is three byte tokens, none decodes to it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a"], trainers.BpeTrainer(
        vocab_size=1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = tok.encode("。").ids
    assert len(ids) == 3
    ends = segments.ends_table(tok)
    assert not ends[ids].any() and ends[tok.encode(".").ids[0]]


def test_byte_fallback_pieces():
    """SentencePiece-style byte fallback: '<0x2E>' decodes to '.', so it ends a subsentence;
    the three byte pieces of '。' decode to U+FFFD alone and do not."""
    vocab = {"<unk>": 0, "a": 1, "b": 2, "<0x2E>": 3, "<0xE3>": 4, "<0x80>": 5, "<0x82>": 6}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    assert tok.encode("a.b").tokens == ["a", "<0x2E>", "b"]
    np.testing.assert_array_equal(segments.ends_table(tok),
                                  [False, False, False, True, False, False, False])


@pytest.mark.parametrize("min_tokens", [1, 2, 3])
@pytest.mark.parametrize("guard", [False, True])
def test_segment_ids_match_loop_reference(min_tokens, guard):
    rng = np.random.default_rng(min_tokens)
    V, B, T = 12, 6, 20
    ends = np.zeros(V, bool)
    ends[[1, 2, 3]] = True                      # 1 is '.', 2 ',', 3 '.\n'
    dot_end = np.zeros(V, bool)
    dot_end[1] = True
    digit_start = np.zeros(V, bool)
    digit_start[[4, 5]] = True
    tokens = rng.choice([0, 1, 1, 2, 3, 4, 5, 6], size=(B, T))
    lengths = np.array([T, 0, 1, 7, 13, T - 1])
    mask = np.arange(T)[None, :] < lengths[:, None]
    tables = dict(dot_end=dot_end, digit_start=digit_start) if guard else {}
    got = np.asarray(segments.segment_ids(tokens, mask, ends, min_subsentence_tokens=min_tokens,
                                          **tables))
    want = ref.subsentences(tokens, mask, ends, min_tokens=min_tokens, **tables)
    np.testing.assert_array_equal(got, want + (np.arange(B) * T)[:, None])
    assert got.dtype == np.int32 and got.max() < B * T


def test_segment_errors_are_clear(bpe):
    ends = segments.ends_table(bpe)
    tokens = np.zeros((2, 4), np.int32)
    mask = np.ones((2, 4), bool)
    with pytest.raises(ValueError, match="both dot_end and digit_start"):
        segments.segment_ids(tokens, mask, ends, dot_end=ends)
    with pytest.raises(ValueError, match="min_subsentence_tokens"):
        segments.segment_ids(tokens, mask, ends, min_subsentence_tokens=0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        segments.segment_ids(tokens[0], mask[0], ends)
    with pytest.raises(ValueError, match="non-empty strings"):
        segments.ends_table(bpe, delimiters=(".", ""))
    with pytest.raises(ValueError, match="vocab_size"):
        segments.ends_table(bpe, vocab_size=3)
    with pytest.raises(TypeError, match="Hugging Face tokenizer"):
        segments.ends_table(object())
