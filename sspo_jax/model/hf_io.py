"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded index).

Loading places every tensor straight into its target sharding: each device's shard is read from
disk on its own (safetensors slices), so no unsharded copy of the model exists on one device.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (lets safetensors' numpy reader return bfloat16)
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from sspo_jax.model.config import Qwen2Config
from sspo_jax.model.qwen2 import Qwen2ForCausalLM, abstract_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# our per-layer parameter -> (HF name inside model.layers.{l}., stored as [out, in] so transpose)
LAYER_WEIGHTS = {
    "input_norm": ("input_layernorm.weight", False),
    "q_w": ("self_attn.q_proj.weight", True),
    "q_b": ("self_attn.q_proj.bias", False),
    "k_w": ("self_attn.k_proj.weight", True),
    "k_b": ("self_attn.k_proj.bias", False),
    "v_w": ("self_attn.v_proj.weight", True),
    "v_b": ("self_attn.v_proj.bias", False),
    "o_w": ("self_attn.o_proj.weight", True),
    "post_norm": ("post_attention_layernorm.weight", False),
    "gate_w": ("mlp.gate_proj.weight", True),
    "up_w": ("mlp.up_proj.weight", True),
    "down_w": ("mlp.down_proj.weight", True),
}


def _weight_plan(model: Qwen2ForCausalLM) -> Iterator[tuple[nnx.Param, list[str], bool, bool]]:
    """(our Variable, its HF names (one per layer when stacked), transpose?, stacked?)."""
    cfg = model.config
    yield model.embed, ["model.embed_tokens.weight"], False, False
    for name, (hf_suffix, transpose) in LAYER_WEIGHTS.items():
        names = [f"model.layers.{l}.{hf_suffix}" for l in range(cfg.num_hidden_layers)]
        yield getattr(model.layers, name), names, transpose, True
    yield model.final_norm, ["model.norm.weight"], False, False
    if not cfg.tie_word_embeddings:
        yield model.lm_head, ["lm_head.weight"], True, False


def _weight_files(hf_dir: str) -> dict[str, str]:
    """HF weight name -> safetensors file path."""
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: os.path.join(hf_dir, fname) for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"missing weight file {path}, listed in {index_path}")
        return files
    single = os.path.join(hf_dir, SINGLE_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(
            f"missing weight files in {hf_dir}: expected {SINGLE_FILE} or {INDEX_FILE} "
            "(only safetensors checkpoints are supported)")
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def from_pretrained(hf_dir: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = None,
                    mesh: Mesh | None = None, remat: str = "none", attention: str = "auto",
                    platform: str | None = None) -> Qwen2ForCausalLM:
    """Loads a HF Qwen2 checkpoint directory into a Qwen2ForCausalLM.

    dtype: compute dtype; param_dtype: parameter dtype (None: same as dtype); with a mesh, every
    parameter is created directly in its NamedSharding (logical axes by sspo_jax.parallel);
    attention, platform: the model's backend (Qwen2ForCausalLM; platform default: the mesh's).
    Names and shapes are checked against the config before anything is read.
    """
    hf_dir = os.fspath(hf_dir)
    cfg = Qwen2Config.from_hf(hf_dir)
    param_dtype = param_dtype or dtype
    model = abstract_model(cfg, mesh=mesh, dtype=dtype, param_dtype=param_dtype, remat=remat,
                           attention=attention, **({} if platform is None else {"platform": platform}))
    files = _weight_files(hf_dir)
    plan = list(_weight_plan(model))
    handles = {path: safe_open(path, framework="numpy") for path in sorted(set(files.values()))}
    _check_names_and_shapes(plan, files, handles, cfg)
    for var, names, transpose, stacked in plan:
        slices = [handles[files[n]].get_slice(n) for n in names]
        var.set_value(_load_sharded(var.shape, var.get_value().sharding, slices, transpose, stacked,
                                    param_dtype))
    return model


def _check_names_and_shapes(plan, files: dict[str, str], handles: dict[str, Any], cfg: Qwen2Config) -> None:
    """Raises naming the first missing, unexpected or mis-shaped weight (HF layout)."""
    expected = {}
    for var, names, transpose, stacked in plan:
        shape = tuple(var.shape[1:]) if stacked else tuple(var.shape)
        for n in names:
            expected[n] = shape[::-1] if transpose else shape
    missing = [n for n in expected if n not in files]
    if missing:
        raise KeyError(f"checkpoint is missing weight(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                       f"that the config (num_hidden_layers={cfg.num_hidden_layers}, "
                       f"tie_word_embeddings={cfg.tie_word_embeddings}) requires")
    # A tied checkpoint may still store lm_head.weight (a copy of the embedding): ignored.
    allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = [n for n in files if n not in expected and n not in allowed_extra]
    if unexpected:
        raise KeyError(f"unexpected weight(s) {unexpected[:5]} in {files[unexpected[0]]}: not part of a "
                       f"Qwen2 model with this config (num_hidden_layers={cfg.num_hidden_layers})")
    for name, want in expected.items():
        path = files[name]
        found = tuple(handles[path].get_slice(name).get_shape())
        if found != want:
            raise ValueError(f"weight {name} in {path} has shape {found}, but the config expects {want}")


def _load_sharded(shape, sharding, slices, transpose: bool, stacked: bool, dtype) -> jax.Array:
    """A jax.Array of our `shape` built shard by shard from safetensors slices."""
    np_dtype = np.dtype(jnp.dtype(dtype))

    def read(hf_slice, idx):  # idx: slices into ONE (unstacked) parameter, our layout
        if transpose:
            return np.asarray(hf_slice[idx[1], idx[0]]).T
        return np.asarray(hf_slice[idx])

    def callback(index):
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
        if stacked:
            parts = [read(slices[l], index[1:]) for l in range(*index[0].indices(shape[0]))]
            block = np.stack(parts)
        else:
            block = read(slices[0], index)
        return np.ascontiguousarray(block.astype(np_dtype))

    return jax.make_array_from_callback(tuple(shape), sharding, callback)


def save_pretrained(model: Qwen2ForCausalLM, out_dir: str | os.PathLike, dtype: Any = None,
                    max_shard_bytes: int = 5 * 2**30, *, eos_token_ids: Sequence[int] = (),
                    pad_token_id: int | None = None) -> None:
    """Writes config.json + safetensors that transformers loads as Qwen2ForCausalLM.

    dtype: on-disk dtype (None: the parameter dtype). Over `max_shard_bytes`, the weights are split
    into model-0000k-of-0000n.safetensors files with a model.safetensors.index.json.
    eos_token_ids (the tokenizer's EOS first) and pad_token_id, when given, go into config.json
    and a generation_config.json, so `generate` in transformers stops where the sampler stops.
    Files are readable by all (0644), like those transformers writes.
    With several JAX processes every process must call it (each tensor is all-gathered); process
    0 writes the files.
    """
    from sspo_jax.parallel import to_numpy
    out_dir = os.fspath(out_dir)
    tensors: dict[str, np.ndarray] = {}
    for var, names, transpose, stacked in _weight_plan(model):
        value = to_numpy(var[...])
        if dtype is not None:
            value = value.astype(np.dtype(jnp.dtype(dtype)))
        per_name = list(value) if stacked else [value]
        for name, arr in zip(names, per_name):
            tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)
    if jax.process_index() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    dtype_name = str(next(iter(tensors.values())).dtype)
    config = model.config.to_hf_dict(dtype_name)
    if eos_token_ids:
        config["eos_token_id"] = int(eos_token_ids[0])
    if pad_token_id is not None:
        config["pad_token_id"] = int(pad_token_id)
    written = [_write_json(out_dir, "config.json", config)]
    if eos_token_ids:
        generation = {"eos_token_id": [int(e) for e in eos_token_ids],
                      "bos_token_id": config.get("bos_token_id"),
                      **({"pad_token_id": int(pad_token_id)} if pad_token_id is not None else {})}
        written.append(_write_json(out_dir, "generation_config.json", generation))

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors without a known format
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata=metadata)
        written.append(os.path.join(out_dir, SINGLE_FILE))
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata=metadata)
            written.append(os.path.join(out_dir, fname))
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                 "weight_map": weight_map}
        written.append(_write_json(out_dir, INDEX_FILE, index))
    for path in written:  # safetensors creates its files 0600
        os.chmod(path, 0o644)


def _write_json(out_dir: str, name: str, value: dict) -> str:
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
    return path
