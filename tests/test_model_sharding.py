"""Sharding on the 8 fake CPU devices: rules table, mesh, sharded loading, sharded forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
from flax import nnx
from jax.sharding import PartitionSpec as P

from sspo_jax import model as M
from sspo_jax import parallel as S

MESHES = {"fsdp2_tensor4": dict(data=1, fsdp=2, tensor=4), "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}

forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))
cached = nnx.jit(lambda m, ids, mask, cache: m(ids, attention_mask=mask, cache=cache))


def test_make_mesh_sizes_and_errors():
    mesh = S.make_mesh(fsdp=2, tensor=4)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert dict(S.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(S.make_mesh(data=-1, fsdp=1).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(S.make_mesh(tensor=2, devices=jax.devices()[:4]).shape)["fsdp"] == 2
    with pytest.raises(ValueError, match="at most one of data/fsdp/tensor may be -1"):
        S.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="data\\*fsdp\\*tensor = 6 but 8 devices"):
        S.make_mesh(data=1, fsdp=2, tensor=3)
    with pytest.raises(ValueError, match="do not split"):
        S.make_mesh(fsdp=-1, tensor=3)


def test_logical_to_spec_follows_the_rules_table():
    mesh = S.make_mesh(fsdp=2, tensor=4)
    assert S.logical_to_spec(("layers", "embed", "heads")) == P(None, "fsdp", "tensor")
    assert S.logical_to_spec(("batch", "seq", "vocab")) == P(("data", "fsdp"), None, "tensor")
    # A mesh axis that does not divide the dimension is dropped: odd vocab is replicated.
    assert S.logical_to_spec(("vocab", "embed"), (137, 64), mesh) == P(None, "fsdp")
    assert S.logical_to_spec(("vocab", "embed"), (132, 64), mesh) == P("tensor", "fsdp")
    # data has size 1 here and always divides; batch 3 is not divisible by fsdp=2.
    assert S.logical_to_spec(("batch", "seq"), (3, 5), mesh) == P("data", None)
    # A mesh axis is used at most once per array.
    assert S.logical_to_spec(("embed", "embed"), (4, 4), mesh) == P("fsdp", None)
    with pytest.raises(KeyError, match="unknown logical axis name 'hidden'"):
        S.logical_to_spec(("hidden",))
    with pytest.raises(ValueError, match="do not match shape"):
        S.logical_to_spec(("embed",), (2, 3), mesh)


def test_constrain_is_a_noop_without_a_mesh():
    x = jnp.ones((4, 3))
    assert S.constrain(x, ("batch", "seq")) is x


def test_constrain_uses_the_context_mesh_and_functions_find_theirs_in_their_values():
    mesh = S.make_mesh(fsdp=2, tensor=4)
    x = jnp.ones((4, 3, 8))
    with S.using_mesh(mesh):
        y = jax.jit(lambda a: S.constrain(a * 2, ("batch", "seq", "vocab")))(x)
    assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("fsdp", None, "tensor")), 3)
    assert S.mesh_of({"a": x, "b": [y]}) == mesh and S.mesh_of({"a": x}) is None
    with S.using_mesh(None):  # one device: no context, constraints are no-ops
        assert S.constrain(x, ("batch", "seq", "vocab")) is x


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("shard")
    # 8 q heads over 4 kv heads (head_dim 8), vocab divisible by 4 so every rule applies.
    tiny_hf.make_qwen2(path, seed=7, num_attention_heads=8, num_key_value_heads=4, vocab_size=132)
    ids, mask = tiny_hf.left_padded_batch([9, 4, 6, 1], 132, seed=7)
    return path, jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32)


def test_from_pretrained_places_each_parameter_in_its_sharding(ckpt):
    path, _, _ = ckpt
    mesh = S.make_mesh(fsdp=2, tensor=4)
    m = M.from_pretrained(path, mesh=mesh)
    cfg = m.config
    expected = {
        "embed": (m.embed, P("tensor", "fsdp")),
        "q_w": (m.layers.q_w, P(None, "fsdp", "tensor")),
        "o_w": (m.layers.o_w, P(None, "tensor", "fsdp")),
        "down_w": (m.layers.down_w, P(None, "tensor", "fsdp")),
        "k_b": (m.layers.k_b, P(None, "tensor")),
        "lm_head": (m.lm_head, P("fsdp", "tensor")),
        "final_norm": (m.final_norm, P(None)),
    }
    for name, (var, spec) in expected.items():
        arr = var[...]
        assert arr.sharding.mesh == mesh and arr.sharding.spec == spec, (name, arr.sharding.spec)
    # Each device holds only its block: [L, H/fsdp, Nq*D/tensor].
    q = m.layers.q_w[...]
    assert q.addressable_shards[0].data.shape == (
        cfg.num_hidden_layers, cfg.hidden_size // 2, cfg.num_attention_heads * cfg.head_dim // 4)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_forward_equals_unsharded(ckpt, mesh_name):
    path, ids, mask = ckpt
    mesh = S.make_mesh(**MESHES[mesh_name])
    plain = np.asarray(forward(M.from_pretrained(path), ids, mask))
    model = M.from_pretrained(path, mesh=mesh)
    with S.using_mesh(mesh):  # the activations constrained to the mesh of the weights
        sharded = forward(model, ids, mask)
    want = S.named_sharding(mesh, ("batch", "seq", "vocab"), sharded.shape)
    assert want.spec == P(("data", "fsdp"), None, "tensor")
    assert sharded.sharding.is_equivalent_to(want, sharded.ndim)  # size-1 axes may be elided
    np.testing.assert_allclose(np.asarray(sharded), plain, atol=1e-5, rtol=0)


@pytest.mark.slow  # four compilations: ~10 s idle, ~40 s on a loaded 2-core CPU
def test_shard_model_then_cached_decode_equals_unsharded(ckpt):
    path, ids, mask = ckpt
    mesh = S.make_mesh(fsdp=2, tensor=4)
    plain = M.from_pretrained(path)
    moved = S.shard_model(M.from_pretrained(path), mesh)
    assert S.mesh_of(nnx.state(moved)) == mesh and not hasattr(moved, "mesh")  # no mesh on the Module
    assert moved.layers.up_w[...].sharding.spec == P(None, "fsdp", "tensor")
    outs = []
    for m in (plain, moved):
        with S.using_mesh(S.mesh_of(nnx.state(m))):
            cache = m.init_cache(ids.shape[0], ids.shape[1] + 1)
            _, cache = cached(m, ids, mask, cache)
            logits, cache = cached(m, ids[:, -1:], jnp.ones_like(ids[:, -1:]), cache)
        outs.append(np.asarray(logits))
    want = S.named_sharding(mesh, M.cache.KV_AXES, cache.k.shape)
    assert want.spec == P(None, ("data", "fsdp"), "tensor", None, None)  # [L, B, Hkv, S, Dh]
    assert cache.k.sharding.is_equivalent_to(want, cache.k.ndim)
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=0)


def test_rules_are_a_value_and_an_axis_that_cannot_split_is_reported(caplog):
    rules = S.LOGICAL_RULES.replace(vocab=None)
    assert rules["vocab"] == () and S.LOGICAL_RULES["vocab"] == ("tensor",)  # a copy, not a patch
    assert hash(rules) != hash(S.LOGICAL_RULES) and S.SAMPLER_RULES["embed"] == ()
    with pytest.raises(KeyError, match="unknown logical axis name"):
        S.LOGICAL_RULES.replace(hidden="fsdp")
    mesh = S.make_mesh(fsdp=2, tensor=4)
    assert S.logical_to_spec(("vocab", "embed"), (132, 64), mesh, rules) == P(None, "fsdp")
    with caplog.at_level("WARNING", logger="sspo_jax.parallel.rules"):
        assert S.logical_to_spec(("vocab", "embed"), (9973, 64), mesh) == P(None, "fsdp")
        S.logical_to_spec(("vocab", "embed"), (9973, 64), mesh)  # said once, not per call
    said = [r.getMessage() for r in caplog.records]
    assert said == ["sharding: vocab of size 9973 does not split over mesh axis tensor (4 devices): "
                    "replicated over it"]
