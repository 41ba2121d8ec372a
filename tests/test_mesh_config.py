"""The mesh from the config (ICI/DCN split, device subsets, errors), the sampler's resharded copy
of the weights, and the per-process row blocks of multi-host grading."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from sspo_jax import model as M
from sspo_jax import parallel
from sspo_jax.generate import sampler
from sspo_jax.run_config import base_config
from sspo_jax.train import grading


def _mesh_cfg(**kw):
    c = base_config().mesh
    c.update(kw)
    return c


def test_mesh_from_config_sizes_and_the_rest():
    mesh = parallel.mesh_from_config(_mesh_cfg(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parallel.batch_shards(mesh) == 4
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    one = parallel.mesh_from_config(_mesh_cfg(devices=1))
    assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("kw,message", [
    (dict(data=3, fsdp=1, tensor=1), "does not fit 8 devices"),
    (dict(data=-1, fsdp=-1), "at most one of data/fsdp/tensor may be -1"),
    (dict(devices=16), "mesh.devices=16 but 8 devices"),
    (dict(dcn_data=3), "do not split into 3 slices"),
])
def test_bad_mesh_configs_name_the_fields(kw, message):
    with pytest.raises(ValueError, match=message):
        parallel.mesh_from_config(_mesh_cfg(**kw))


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """Enough of a device for mesh_utils: two 'slices' of four devices."""
    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_multi_slice_mesh_puts_the_dcn_axis_across_slices():
    devices = [FakeDevice(i, i // 4, i // 4) for i in range(8)]
    grid = parallel.make_mesh(data=1, fsdp=-1, tensor=2, devices=devices, dcn=(2, 1, 1)).devices
    assert grid.shape == (2, 2, 2)
    # data crosses the slices; fsdp and tensor stay within one slice (fast interconnect).
    assert [{d.slice_index for d in grid[i].flat} for i in range(2)] == [{0}, {1}]
    # Sizes are per slice: fsdp=2 within each of 2 slices is fsdp=4 in all, slices outermost.
    grid = parallel.make_mesh(data=2, fsdp=2, tensor=1, devices=devices, dcn=(1, 2, 1)).devices
    assert grid.shape == (2, 4, 1)
    assert [{d.slice_index for d in grid[:, j].flat} for j in range(4)] == [{0}, {0}, {1}, {1}]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sampler_copy_is_gathered_over_fsdp_in_the_compute_dtype_and_samples_the_same(dtype):
    cfg = M.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        max_position_embeddings=64)
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    model = parallel.shard_model(M.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype), mesh)
    graphdef, params = nnx.split(model)
    copy = parallel.sampler_params(params, nnx.state(model), mesh, dtype)
    train_specs = [str(x.sharding.spec) for x in jax.tree.leaves(params)]
    copy_specs = [str(x.sharding.spec) for x in jax.tree.leaves(copy)]
    assert any("fsdp" in s for s in train_specs)
    assert not any("fsdp" in s for s in copy_specs) and any("tensor" in s for s in copy_specs)
    # Matrices, biases and the embedding in the compute dtype; norms (computed in float32) not.
    for path, leaf in jax.tree_util.tree_leaves_with_path(copy):
        want = jnp.float32 if "norm" in jax.tree_util.keystr(path) else dtype
        assert leaf.dtype == want, (jax.tree_util.keystr(path), leaf.dtype)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # the training copy
    ids = np.random.default_rng(0).integers(1, 64, (4, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    kw = dict(num_samples=2, max_new_tokens=8, temperature=1.0, eos_ids=(1,), pad_id=0)
    a = sampler.generate(nnx.merge(graphdef, params), ids, mask, jax.random.key(3), **kw)
    b = sampler.generate(nnx.merge(graphdef, copy), ids, mask, jax.random.key(3), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    # The forward casts float32 weights to the compute dtype itself, so casting them once
    # beforehand gives the same products: float32 log-probs within 1e-5.
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
    # The copy is made every RL step: its program compiles once, not per call.
    compiles = []
    listener = lambda event, _, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(2):
            parallel.sampler_params(params, nnx.state(model), mesh, dtype)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


@pytest.mark.parametrize("n,count", [(10, 3), (8, 2), (3, 4), (1024, 32)])
def test_process_blocks_cover_every_row_once(n, count):
    blocks = [parallel.process_block(n, i, count) for i in range(count)]
    rows = [r for b in blocks for r in range(n)[b]]
    assert rows == list(range(n))
    sizes = [b.stop - b.start for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_one_process_grading_and_gathers_are_the_plain_ones():
    assert parallel.allgather_blocks(np.arange(6.0), 6).tolist() == list(range(6))
    x = jax.device_put(np.arange(8.0), parallel.named_sharding(
        parallel.make_mesh(data=8, fsdp=1, tensor=1), ("batch",), (8,)))
    assert parallel.to_numpy(x).tolist() == list(range(8))

    class Grader:
        def grade(self, texts, golds, timeout):
            from sspo_jax.rewards import GradeResult
            return [GradeResult(float(t == g), "correct" if t == g else "wrong", t) for t, g in zip(texts, golds)]

    results = grading.grade_across_hosts(Grader(), ["1", "2"], ["1", "3"], 1.0)
    assert [r.score for r in results] == [1.0, 0.0]


def test_partial_multi_process_flags_are_refused():
    with pytest.raises(ValueError, match="give all of --coordinator_address"):
        parallel.initialize("localhost:1234", None, 0)
    with pytest.raises(ValueError, match="--process_id=2 must be in"):
        parallel.initialize("localhost:1234", 2, 2)


def test_config_mesh_block_is_a_configdict():
    assert isinstance(base_config().mesh, ConfigDict)


@pytest.mark.slow  # waits the 5 s timeout
def test_a_missing_peer_stops_the_run_after_the_timeout_and_says_so_first(tmp_path):
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "sspo_jax.train", f"--workdir={tmp_path}", "--num_processes=2",
         "--process_id=1", f"--coordinator_address=localhost:{port}", "--distributed_timeout_s=5"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0  # stopped, not waiting forever
    assert proc.stdout.startswith(f"process 1 of 2: joining localhost:{port}; it stops after 5 s")
    assert "--process_id=0 .. 1" in proc.stdout
