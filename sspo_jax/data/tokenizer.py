"""The project's own small tokenizer for the synthetic task (HF format, no download).

A byte-level BPE built the way Qwen2's is, so it is what `transformers` rebuilds from its files:
Qwen2's pre-tokenizer (its regex, then byte-level), NFC normalisation, a byte-level decoder, and
BPE merges trained on the synthetic task's texts (a fixed, seeded set of its problems and
solutions, the task's text fragments and the prompt templates) until every word of them is one
token. So digits are single tokens (Qwen's regex splits numbers digit by digit), a word keeps its
leading space (" apples"), punctuation runs are tokens (".", ".\n", "}."), and any other text
still encodes (as byte pieces; nothing is unknown). `transformers` 5 loads a directory whose
config.json says `model_type: qwen2` with `Qwen2Tokenizer`, which rebuilds the tokenizer from
vocab and merges with Qwen2's own pre-tokenizer: with this design that is the same tokenizer, so
an exported demo model loads with plain `AutoTokenizer`. ChatML special tokens are ids 0-4.
Training is deterministic, so every build gives the same ids.
"""
from __future__ import annotations

import functools
import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2 import tokenization_qwen2 as _qwen2_tokenization

from sspo_jax.data import synthetic
from sspo_jax.data.templates import PLAIN_INSTRUCTION, QWEN_MATH_SYSTEM_PROMPT

ENDOFTEXT, IM_START, IM_END, PAD, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD, UNK)  # ids 0..4, in this order
# Qwen2's pre-tokenization regex, taken from the class transformers rebuilds the tokenizer with
# (not a copy, so the two cannot drift apart).
QWEN2_PRETOKENIZE_REGEX = _qwen2_tokenization.PRETOKENIZE_REGEX
# The synthetic rows the merges are trained on (fixed, so the vocabulary never changes).
_TRAINING_ROWS, _TRAINING_SEED = 3000, 20240601
# ChatML with no default system message (the qwen25-math-cot template adds its own).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def training_texts() -> list[str]:
    """The texts the merges are learned from: the task's fragments, the templates' text, and a
    fixed set of generated problems and solutions of every level (both splits)."""
    texts = [QWEN_MATH_SYSTEM_PROMPT, PLAIN_INSTRUCTION, "system\nuser\nassistant\n"]
    for text in synthetic.TEXT_FRAGMENTS:
        texts.append(re.sub(r"\{[a-z]+\}", " ", text).replace("{{", "{").replace("}}", "}"))
    levels = tuple(synthetic.LEVELS)
    for split in synthetic.SPLITS:
        for row in synthetic.generate(_TRAINING_ROWS, split=split, levels=levels, seed=_TRAINING_SEED):
            texts += [row["problem"], row["solution"]]
    return texts


@functools.lru_cache(maxsize=1)
def _trained() -> str:
    """The trained tokenizer as JSON (trained once per process: about a second)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1 << 20, min_frequency=1, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_texts(), trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer.to_str()


def build_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A fresh tokenizer: eos ``<|im_end|>`` (ends an assistant turn), pad ``<|pad|>``, unk
    ``<|unk|>`` (never produced: byte-level), no bos, left padding. Save it with
    ``save_pretrained(dir)``; ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it back,
    beside a Qwen2 config.json too."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained()), eos_token=IM_END, pad_token=PAD, unk_token=UNK,
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
