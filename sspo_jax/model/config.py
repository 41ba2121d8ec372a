"""Qwen2 configuration read from a Hugging Face `config.json` (or its dict)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Frozen and hashable, so it can be a static argument under jit."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def num_groups(self) -> int:
        """Query heads per kv head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> "Qwen2Config":
        """From a HF checkpoint directory, a config.json path, or the config dict."""
        if isinstance(source, dict):
            raw, where = source, "config dict"
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"missing config.json: {path} does not exist; a Hugging Face checkpoint directory "
                    "needs config.json next to its *.safetensors files")
            with open(path) as f:
                raw = json.load(f)
            where = path
        return _from_dict(raw, where)

    def to_hf_dict(self, dtype_name: str = "float32") -> dict[str, Any]:
        """config.json contents that transformers loads as `Qwen2ForCausalLM`."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": dtype_name,
            "dtype": dtype_name,
        }


def _rope_theta(raw: dict[str, Any], where: str) -> float:
    # transformers 5 writes rope_parameters {"rope_theta", "rope_type"}; hub Qwen2.5 checkpoints
    # have a top-level rope_theta and "rope_scaling": null.
    for key in ("rope_parameters", "rope_scaling"):
        params = raw.get(key)
        if params:
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type != "default":
                raise NotImplementedError(
                    f"{where}: {key} rope_type={rope_type!r} is not supported (only 'default' rotary "
                    "embeddings are implemented)")
            if "rope_theta" in params:
                return float(params["rope_theta"])
    return float(raw.get("rope_theta", 10000.0))


def _from_dict(raw: dict[str, Any], where: str) -> Qwen2Config:
    model_type = raw.get("model_type", "qwen2")
    archs = raw.get("architectures") or ["Qwen2ForCausalLM"]
    if model_type != "qwen2" or any(a not in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(
            f"{where}: unknown architecture {archs} / model_type {model_type!r}; only Qwen2 / Qwen2.5 "
            "(architectures ['Qwen2ForCausalLM'], model_type 'qwen2') is supported")
    if raw.get("use_sliding_window", False):
        raise NotImplementedError(
            f"{where}: use_sliding_window=true is not supported; only full attention is implemented "
            "(set use_sliding_window to false, as Qwen2.5 checkpoints do)")
    if any(t != "full_attention" for t in raw.get("layer_types") or []):
        raise NotImplementedError(f"{where}: layer_types {raw['layer_types']} include non-full attention")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"{where}: hidden_act={act!r} is not supported (only 'silu')")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in raw]
    if missing:
        raise ValueError(f"{where}: config is missing required keys {missing}")
    heads = int(raw["num_attention_heads"])
    eos = raw.get("eos_token_id")
    return Qwen2Config(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
        rope_theta=_rope_theta(raw, where),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )
