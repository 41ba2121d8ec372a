"""The project's own small tokenizer for the synthetic task (HF format, no download).

A word-level vocabulary built from the synthetic task's texts and the prompt templates: each
word with and without a leading space (" apples", "apples"), every digit as its own token (so
numbers are spelled digit by digit), punctuation and newline as their own tokens (so
subsentence delimiters are single tokens), ChatML special tokens, and a chat template.
Decoding concatenates the token strings, so encode -> decode is exact for any text made of
known pieces. The vocabulary is sorted, so every build gives the same ids.
"""
from __future__ import annotations

import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sspo_jax.data import synthetic
from sspo_jax.data.templates import PLAIN_INSTRUCTION, QWEN_MATH_SYSTEM_PROMPT

ENDOFTEXT, IM_START, IM_END, PAD, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD, UNK)  # ids 0..4, in this order
DIGITS = tuple("0123456789")
SYMBOLS = tuple(".,?:;!+-*/=(){}$%")
# A piece is an optionally space-prefixed word, digit, LaTeX command or symbol, or one
# whitespace character; every character of any text falls in exactly one piece.
PIECE_PATTERN = r" ?[A-Za-z]+| ?\d| ?\\[A-Za-z]+| ?[^\sA-Za-z\d]|\s"
# ChatML with no default system message (the qwen25-math-cot template adds its own).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")


def vocabulary() -> list[str]:
    """The non-special tokens, sorted: every piece of the task and template texts, each with
    and without a leading space, plus digits, symbols, a space and a newline."""
    corpus = list(synthetic.TEXT_FRAGMENTS) + [
        QWEN_MATH_SYSTEM_PROMPT, PLAIN_INSTRUCTION, "system user assistant",
    ]
    splitter = _pre_tokenizer()
    pieces = set(DIGITS) | set(SYMBOLS)
    for text in corpus:
        text = re.sub(r"\{[a-z]+\}", " ", text)  # format placeholders such as {name}
        text = text.replace("{{", "{").replace("}}", "}")
        pieces.update(piece for piece, _ in splitter.pre_tokenize_str(text))
    bare = {piece.lstrip(" ") for piece in pieces} - {""}
    return sorted(bare | {" " + piece for piece in bare} | {" ", "\n"})


def build_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A fresh tokenizer: eos ``<|im_end|>`` (ends an assistant turn), pad ``<|pad|>``, unk
    ``<|unk|>``, no bos, left padding. Save it with ``save_pretrained(dir)`` and load it back
    with ``transformers.AutoTokenizer.from_pretrained(dir)``."""
    tokens = list(SPECIAL_TOKENS) + vocabulary()
    model = models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token=UNK)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=IM_END, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[IM_START, ENDOFTEXT], padding_side="left",
        model_max_length=model_max_length, chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# Tokenizers saved from a plain `tokenizers` object record one of these classes.
_PLAIN_BACKEND_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path):
    """A saved Hugging Face tokenizer, loaded as it was saved.

    `AutoTokenizer` is right for real checkpoints (Qwen's `tokenizer_config.json` names
    `Qwen2Tokenizer`). But for a tokenizer saved from a plain `tokenizers` object (such as
    `build_tokenizer()`'s) in a directory whose `config.json` says `model_type: qwen2`,
    transformers 5 builds the model type's tokenizer class instead, which replaces the saved
    pre-tokenizer, normalizer and decoder and silently changes every token id. Such tokenizers are
    therefore loaded through the plain fast-tokenizer class.
    """
    import json
    import os

    from transformers import AutoTokenizer

    config_path = os.path.join(os.fspath(path), "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            if json.load(f).get("tokenizer_class") in _PLAIN_BACKEND_CLASSES:
                return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
