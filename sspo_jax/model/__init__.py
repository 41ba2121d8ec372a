"""Qwen2 / Qwen2.5 in Flax NNX and Hugging Face checkpoints in and out (contract: docs/design.md)."""
from sspo_jax.model.backend import ATTENTION_CHOICES, Backend, platform_of
from sspo_jax.model.cache import KVCache, init_cache
from sspo_jax.model.config import Qwen2Config
from sspo_jax.model.hf_io import from_pretrained, save_pretrained
from sspo_jax.model.qwen2 import REMAT_POLICIES, Decoder, Qwen2ForCausalLM, abstract_model

__all__ = ["ATTENTION_CHOICES", "Backend", "Decoder", "platform_of", "KVCache", "init_cache", "Qwen2Config",
           "Qwen2ForCausalLM", "REMAT_POLICIES", "abstract_model",
           "from_pretrained", "save_pretrained"]
