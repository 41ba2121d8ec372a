"""Prompt templates produce exactly the pinned strings."""
import pytest

from sspo_jax.data.templates import TEMPLATE_NAMES, render_prompt
from sspo_jax.data.tokenizer import build_tokenizer

PROBLEM = "Tom has 3 apples. How many apples does Tom have now?"


def test_qwen25_math_cot_is_chatml_with_the_qwen_math_system_prompt():
    expected = (
        "<|im_start|>system\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\n"
        "Tom has 3 apples. How many apples does Tom have now?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt(PROBLEM, "qwen25-math-cot") == expected


def test_plain_is_problem_then_instruction():
    expected = (
        "Tom has 3 apples. How many apples does Tom have now?\n"
        "Please reason step by step, and put your final answer within \\boxed{}.\n"
    )
    assert render_prompt(PROBLEM, "plain") == expected


def test_chat_uses_the_tokenizers_own_template():
    expected = (
        "<|im_start|>user\n"
        "Tom has 3 apples. How many apples does Tom have now?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt(PROBLEM, "chat", build_tokenizer()) == expected


def test_chat_without_a_chat_template_and_unknown_names_are_clear_errors():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt(PROBLEM, "chat", tokenizer)
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt(PROBLEM, "chat")
    with pytest.raises(ValueError, match="unknown prompt template 'qwen'"):
        render_prompt(PROBLEM, "qwen")
    assert TEMPLATE_NAMES == ("qwen25-math-cot", "plain", "chat")
