"""The sampler under a (data=2, fsdp=2, tensor=2) mesh of the 8 fake CPU devices gives the unsharded result."""
import jax
import numpy as np
import pytest
import tiny_hf

from sspo_jax import model as M
from sspo_jax.generate import sampler
from sspo_jax.parallel import make_mesh


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_mesh")
    tiny_hf.make_qwen2(path, seed=4)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    return M.from_pretrained(path), M.from_pretrained(path, mesh=mesh), mesh


ENGINES = {"static": {}, "continuous": dict(engine="continuous", slots=1, chunk_steps=3)}


@pytest.mark.slow  # 10-40 s on the shared 2-core CPU (load dependent): two compilations, one over 8 devices
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sharded_sampling_equals_unsharded(models, engine):
    """The continuous engine with 1 slot per batch shard: 4 slot groups of one slot, each
    queueing its own 2 rows."""
    plain, sharded, mesh = models
    assert len(sharded.lm_head[...].sharding.device_set) == 8  # the weights really are spread out
    ids, mask = tiny_hf.left_padded_batch([6, 2, 9, 4], tiny_hf.BASE["vocab_size"], seed=5)
    kw = dict(num_samples=2, max_new_tokens=8, temperature=1.0, top_p=0.9, eos_ids=(5, 6), pad_id=0)
    ref = sampler.generate(plain, ids.numpy(), mask.numpy(), jax.random.key(9), **kw)
    out = sampler.generate(sharded, ids.numpy(), mask.numpy(), jax.random.key(9), **kw, **ENGINES[engine])
    # Rows (4 prompts x 2 samples) are split over the data x fsdp = 4 batch shards.
    assert out.tokens.sharding.shard_shape(out.tokens.shape)[0] == 2
    if engine == "continuous":  # 4 slots in all, each row decoded after its group's other one
        assert int(out.slot_steps) == 4 * int(out.decode_steps)
        assert int(out.decode_steps) >= np.asarray(ref.lengths).reshape(4, 2).sum(1).max()
    for name in ("tokens", "mask", "lengths", "truncated"):
        np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)), err_msg=name)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.entropy), np.asarray(ref.entropy), atol=1e-5, rtol=0)
