"""Hugging Face checkpoints in and out: round trips through transformers, and clear errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import tiny_hf
from sspo_jax import model as M


def _hf_load(path, dtype):
    return transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _assert_bit_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("dtype,tied", [(torch.float32, False), (torch.bfloat16, True),
                                        (torch.float16, False)])
def test_round_trip_through_transformers_is_bit_identical(tmp_path, dtype, tied):
    ref = tiny_hf.make_qwen2(tmp_path / "in", seed=1, dtype=dtype, tie_word_embeddings=tied)
    jax_dtype = {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}[dtype]
    m = M.from_pretrained(tmp_path / "in", dtype=jax_dtype)
    assert m.embed[...].dtype == jax_dtype
    M.save_pretrained(m, tmp_path / "out")
    back = _hf_load(tmp_path / "out", dtype)
    _assert_bit_identical(ref, back)
    assert back.config.tie_word_embeddings == tied
    assert back.config.rope_parameters["rope_theta"] == ref.config.rope_parameters["rope_theta"]


def test_bf16_checkpoint_loaded_as_float32_saves_back_exactly(tmp_path):
    ref = tiny_hf.make_qwen2(tmp_path / "in", seed=2, dtype=torch.bfloat16)
    m = M.from_pretrained(tmp_path / "in", dtype=jnp.float32)
    assert m.layers.q_w[...].dtype == jnp.float32
    M.save_pretrained(m, tmp_path / "out", dtype=jnp.bfloat16)
    _assert_bit_identical(ref, _hf_load(tmp_path / "out", torch.bfloat16))


def test_sharded_index_checkpoint_in_and_out(tmp_path):
    ref = tiny_hf.make_qwen2(tmp_path / "single", seed=3)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    in_index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(in_index["weight_map"].values())) >= 2
    single, sharded = M.from_pretrained(tmp_path / "single"), M.from_pretrained(tmp_path / "sharded")
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    M.save_pretrained(sharded, tmp_path / "out", max_shard_bytes=150_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and all(os.path.isfile(tmp_path / "out" / f) for f in files)
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
    _assert_bit_identical(ref, _hf_load(tmp_path / "out", torch.float32))


# ---------------------------------------------------------------- config

def test_config_reads_hub_style_and_transformers5_style_rope_theta():
    base = dict(tiny_hf.BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    hub = dict(base, rope_theta=1e6, rope_scaling=None)
    tf5 = {k: v for k, v in base.items() if k != "rope_theta"}
    tf5["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    assert M.Qwen2Config.from_hf(hub).rope_theta == 1e6
    assert M.Qwen2Config.from_hf(tf5).rope_theta == 5e5
    cfg = M.Qwen2Config.from_hf(hub)
    assert cfg.head_dim == 64 // 4 and cfg.num_groups == 2
    assert M.Qwen2Config.from_hf(dict(hub, head_dim=8)).head_dim == 8
    assert hash(cfg) == hash(M.Qwen2Config.from_hf(hub))  # static under jit


@pytest.mark.parametrize("changes,message", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_attention_heads=4 is not a multiple"),
    (dict(hidden_size=60, num_attention_heads=4), "head_dim=15 must be even"),
    (dict(vocab_size=None), "missing required keys \\['vocab_size'\\]"),
])
def test_inconsistent_config_is_named(changes, message):
    raw = {k: v for k, v in dict(tiny_hf.BASE, **changes).items() if v is not None}
    with pytest.raises(ValueError, match=message):
        M.Qwen2Config.from_hf(raw)


# ---------------------------------------------------------------- errors

@pytest.fixture
def ckpt(tmp_path):
    tiny_hf.make_qwen2(tmp_path, seed=4)
    return tmp_path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        M.from_pretrained(tmp_path)


def test_missing_weight_file_is_named(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="missing weight files .*model.safetensors"):
        M.from_pretrained(ckpt)


def test_missing_shard_listed_in_index_is_named(tmp_path):
    tiny_hf.make_qwen2(tmp_path / "x", seed=4).save_pretrained(tmp_path / "s", max_shard_size="100KB")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / "s" / gone)
    with pytest.raises(FileNotFoundError, match=f"missing weight file .*{gone}"):
        M.from_pretrained(tmp_path / "s")


@pytest.mark.parametrize("changes,error,message", [
    (dict(architectures=["LlamaForCausalLM"], model_type="llama"), ValueError, "unknown architecture"),
    (dict(use_sliding_window=True, sliding_window=16), NotImplementedError, "use_sliding_window"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), NotImplementedError,
     "rope_type='yarn'"),
    (dict(hidden_act="gelu"), NotImplementedError, "hidden_act='gelu'"),
])
def test_unsupported_config_is_named(ckpt, changes, error, message):
    _edit_config(ckpt, **changes)
    with pytest.raises(error, match=message):
        M.from_pretrained(ckpt)


def test_missing_weight_name_is_named(ckpt):
    _edit_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match="missing weight.*model.layers.1.mlp.up_proj.weight"):
        M.from_pretrained(ckpt)


def test_unexpected_weight_name_is_named(ckpt):
    _edit_weights(ckpt, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(KeyError, match="unexpected weight.*model.layers.2.mlp.up_proj.weight"):
        M.from_pretrained(ckpt)


def test_shape_mismatch_is_named_with_expected_and_found(ckpt):
    _edit_config(ckpt, intermediate_size=96)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight .* has shape \(160, 64\), "
                                         r"but the config expects \(96, 64\)"):
        M.from_pretrained(ckpt)
