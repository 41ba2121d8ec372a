"""Prompt templates: how a problem becomes the text the policy continues.

Three templates, pinned so evaluation numbers are comparable across runs:

- ``qwen25-math-cot``: ChatML with the system prompt Qwen2.5-Math uses for chain-of-thought,
  ending with the assistant header (the model writes the reply, then ``<|im_end|>``).
- ``plain``: the problem, a newline, a fixed instruction, a newline (for base models that
  are not trained on ChatML).
- ``chat``: the tokenizer's own chat template (one user message, generation prompt added).
"""
from __future__ import annotations

QWEN_MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN_INSTRUCTION = QWEN_MATH_SYSTEM_PROMPT

TEMPLATE_NAMES = ("qwen25-math-cot", "plain", "chat")


def render_prompt(problem: str, template: str, tokenizer=None) -> str:
    """Return the prompt text for one problem under a named template.

    ``tokenizer`` is only needed for ``chat`` (its ``chat_template`` is applied). The result
    contains the special tokens as text; tokenize it with ``add_special_tokens=False``.
    """
    if template == "qwen25-math-cot":
        return (
            f"<|im_start|>system\n{QWEN_MATH_SYSTEM_PROMPT}<|im_end|>\n"
            f"<|im_start|>user\n{problem}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    if template == "plain":
        return f"{problem}\n{PLAIN_INSTRUCTION}\n"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template='chat' needs a tokenizer with a chat_template; this tokenizer has "
                "none. Use template='qwen25-math-cot' or 'plain', or set tokenizer.chat_template."
            )
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": problem}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown prompt template {template!r}; choose one of {TEMPLATE_NAMES}")
