"""The memory plan and cost model (sspo_jax.plan): counts against real models and hand
computations, sharding against parallel.logical_to_spec, the CLI end to end."""
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from sspo_jax import model as M
from sspo_jax import parallel, plan
from sspo_jax.plan import memory as plan_memory
from sspo_jax.plan import tables as plan_tables
from sspo_jax.run_config import base_config
from sspo_jax.train import update

REPO = os.path.join(os.path.dirname(__file__), "..")


def tiny(**kw):
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return M.Qwen2Config(**{**base, **kw})


@pytest.mark.parametrize("kw", [
    dict(tie_word_embeddings=True),                                  # tied head, GQA 4/2
    dict(tie_word_embeddings=False),                                 # untied head
    dict(num_key_value_heads=4, head_dim=16, tie_word_embeddings=False),  # no GQA, head_dim != H/heads
    dict(num_key_value_heads=1, num_hidden_layers=1),                # one kv head
])
def test_param_count_equals_the_real_model(kw):
    cfg = tiny(**kw)
    real = nnx.eval_shape(lambda: M.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))  # shapes only
    leaves = jax.tree.leaves(nnx.state(real, nnx.Param))
    assert plan.param_count(cfg) == sum(x.size for x in leaves)
    assert sum(math.prod(shape) for shape, _ in plan.param_arrays(cfg)) == plan.param_count(cfg)
    assert len(plan.param_arrays(cfg)) == len(leaves)


def test_known_hub_models_have_their_published_sizes():
    # Qwen2.5-1.5B: 1.54B (its model card); Qwen2.5-7B: 7.616B (the Open Arabic LLM
    # leaderboard's request file for Qwen/Qwen2.5-7B); the Math models share these shapes.
    sizes = {name: plan.param_count(M.Qwen2Config(**arch)) for name, arch in plan.KNOWN_MODELS.items()}
    assert round(sizes["Qwen/Qwen2.5-Math-1.5B"] / 1e9, 2) == 1.54
    assert round(sizes["Qwen/Qwen2.5-Math-7B"] / 1e9, 3) == 7.616


@pytest.mark.parametrize("names,shape,sizes", [
    (("vocab", "embed"), (101, 32), {"data": 2, "fsdp": 4, "tensor": 1}),
    (("layers", "embed", "kv_heads"), (3, 32, 16), {"data": 1, "fsdp": 2, "tensor": 4}),
    (("layers", "batch", "kv_heads", "kv_seq", "head_dim"), (2, 12, 2, 10, 4),
     {"data": 2, "fsdp": 3, "tensor": 4}),
    (("batch", "seq", "vocab"), (6, 5, 100), {"data": 4, "fsdp": 2, "tensor": 8}),
])
def test_shard_divisor_follows_the_trainers_rules(names, shape, sizes):
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    spec = parallel.logical_to_spec(names, shape, mesh)
    used = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    assert plan.shard_divisor(names, shape, sizes) == math.prod(sizes[a] for a in used)


@pytest.mark.parametrize("fsdp", [1, 2, 4, 8])
def test_parameter_bytes_scale_as_one_over_fsdp(fsdp):
    cfg = tiny(hidden_size=64, intermediate_size=128)
    L, h = cfg.num_hidden_layers, cfg.hidden_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    replicated = h + L * (2 * h + q + 2 * kv)  # norms and biases have no `embed` axis
    mesh = plan.MeshPlan((1, fsdp, 1), (1, 1, 1), fsdp)
    model = plan.Model(cfg, mesh, "bfloat16", "float32")
    assert model.params() == replicated + (plan.param_count(cfg) - replicated) / fsdp


def test_kv_cache_bytes_by_hand():
    cfg = tiny(num_hidden_layers=2, num_key_value_heads=2, head_dim=4)
    # 8 rows, 10 slots, bf16. data 2 x fsdp 2 split the rows 4 ways, tensor 2 splits the 2 kv heads.
    model = plan.Model(cfg, plan.MeshPlan((2, 2, 2), (1, 1, 1), 8), "bfloat16", "float32")
    k_and_v = 2 * 2 * 8 * 2 * 10 * 4 * 2          # k and v x layers x rows x heads x slots x dim x bytes
    assert model.kv_cache(8, 10) == k_and_v / (4 * 2) + 8 * 10 / 4   # + the bool mask, rows split 4 ways
    # tensor 4 does not divide 2 kv heads: the cache is replicated over tensor.
    model = plan.Model(cfg, plan.MeshPlan((1, 2, 4), (1, 1, 1), 8), "bfloat16", "float32")
    assert model.kv_cache(8, 10) == k_and_v / 2 + 8 * 10 / 2


def test_slices_and_meshes():
    assert (plan.parse_slice("v4-8").chips, plan.parse_slice("v4-8").hosts) == (4, 1)
    assert (plan.parse_slice("v5p-64").chips, plan.parse_slice("v5p-64").hosts) == (32, 8)
    assert plan.parse_slice("v5litepod-8").chip is plan.CHIPS["v5e"]
    assert plan.parse_slice("v5e-8").chips == 8
    with pytest.raises(ValueError, match="multiple of that"):
        plan.parse_slice("v5p-7")
    c = base_config()
    c.mesh.data, c.mesh.fsdp = 1, -1
    assert plan.resolve_mesh(c.mesh, plan.parse_slice("v5p-64")).ici == (1, 32, 1)
    c.mesh.dcn_data = 2  # two slices along data
    mesh = plan.resolve_mesh(c.mesh, plan.parse_slice("v5p-64"))
    assert (mesh.devices, mesh.sizes["data"], mesh.batch_shards) == (64, 2, 64)
    c.mesh.fsdp, c.mesh.tensor = 3, 1
    with pytest.raises(ValueError, match="does not fit the 32 devices"):
        plan.resolve_mesh(c.mesh, plan.parse_slice("v5p-64"))


@pytest.mark.parametrize("name", ["v9-8", "tpu-8", "v5p"])
def test_unknown_slice_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"unknown TPU slice '{name}'.*v5p-64"):
        plan.parse_slice(name)


def test_training_flops_are_six_n_per_token_when_attention_is_negligible():
    c = base_config()
    c.model.hf_dir = "Qwen/Qwen2.5-Math-1.5B"
    c.model.remat = "none"
    c.data.max_prompt_len, c.rollout.max_new_tokens = 16, 16  # a short context: attention ~1%
    cfg = M.Qwen2Config(**plan.KNOWN_MODELS[c.model.hf_dir])
    mesh = plan.resolve_mesh(c.mesh, plan.parse_slice("v5p-8"))
    costs = plan.cost_model(c, cfg, mesh)
    layers, head = plan.matmul_params(cfg)
    rows = c.rollout.prompts_per_step * c.rollout.num_samples
    six_n = 6 * rows * (layers * 32 + head * 16)  # the LM head runs on the 16 response slots only
    assert costs.trained_tokens == rows * 32
    assert 1 < costs.train_model_flops / six_n < 1.02
    # no remat: executed = model FLOPs + the log-prob chunks' recomputed head forward - the half of
    # the attention square (forward and backward) that splash skips above the causal diagonal
    attention = plan.forward_flops(cfg, rows, 32, 32, 0) - plan.forward_flops(cfg, rows, 32, 0, 0)
    assert costs.train_flops == pytest.approx(costs.train_model_flops + 2 * rows * head * 16 - 3 * attention / 2)
    c.model.attention = "xla"  # the whole square
    assert plan.cost_model(c, cfg, mesh).train_flops == pytest.approx(costs.train_model_flops + 2 * rows * head * 16)
    times = plan.step_times(costs, plan.CHIPS["v5p"], 4)
    assert times.train[0] == pytest.approx(costs.train_model_flops / (4 * 459e12 * plan.TRAIN_MFU[1]))
    # the sampler's prefill: the prompts attend among themselves, the LM head on the last position
    assert costs.prefill_flops == plan.forward_flops(cfg, c.rollout.prompts_per_step, 16, 16, 1)


def test_fused_attention_keeps_no_scores_in_memory():
    """At 4k tokens the xla path's [heads, T, T] scores dominate a layer; splash keeps none."""
    cfg = M.Qwen2Config(**plan.KNOWN_MODELS["Qwen/Qwen2.5-Math-1.5B"])
    mesh = plan.MeshPlan((1, 8, 1), (1, 1, 1), 8)
    xla, splash = (plan.Model(cfg, mesh, "bfloat16", "float32", a) for a in ("xla", "splash"))
    assert splash.attention(1, 4024, 4024, 6) == 0
    assert xla.attention(1, 4024, 4024, 6) == 12 * 4024 ** 2 * 6
    for remat in ("none", "full"):
        assert splash.activations(1, 4024, remat) < xla.activations(1, 4024, remat) / 2
    with pytest.raises(ValueError, match="attention='cudnn' does not run on tpu"):
        plan.Model(cfg, mesh, "bfloat16", "float32", "cudnn")


def _math_config(**rollout):
    c = base_config()
    c.model.hf_dir = "Qwen/Qwen2.5-Math-1.5B"
    c.data.max_prompt_len, c.rollout.max_new_tokens = 1024, 3000
    c.rollout.prompts_per_step, c.rollout.num_samples = 128, 8
    c.train.micro_batch_size = 8
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.rollout.update(rollout)
    return c


def test_chip_ici_figures_and_the_all_gather_bandwidth():
    """The table holds the published bidirectional per-chip ICI figures; an fsdp all-gather
    receives over the two links of one torus dimension, one direction each (ICI / ports)."""
    published = {"v5e": (400e9, 4), "v5p": (1200e9, 6), "v6e": (800e9, 4)}
    for family, (both_ways, ports) in published.items():
        chip = plan.CHIPS[family]
        assert (chip.ici_bandwidth, chip.ici_ports) == (both_ways, ports)
        assert chip.ici_gather_bandwidth == pytest.approx(both_ways / ports)
    # v4: derived from the pod bisection (24 TB/s over 512 links of a 16^3 torus), 6 ports.
    assert plan.CHIPS["v4"].ici_link_bandwidth == pytest.approx(24e12 / 512)
    assert plan.CHIPS["v4"].ici_gather_bandwidth == pytest.approx(2 * 24e12 / 512)


@pytest.mark.parametrize("reshard", [False, True])
def test_sharded_decode_pays_its_all_gathers_at_the_gather_bandwidth(reshard):
    """1.5B on a v5p-64 (fsdp=32): each decode step all-gathers the bf16 layers, (31/32) of
    them arriving per device; with the sampler copy there are none and the copy is read in bf16."""
    c = _math_config()
    c.model.dtype, c.mesh.sampler_reshard = "bfloat16", reshard
    cfg = M.Qwen2Config(**plan.KNOWN_MODELS["Qwen/Qwen2.5-Math-1.5B"])
    slice_ = plan.parse_slice("v5p-64")
    mesh = plan.resolve_mesh(c.mesh, slice_)
    costs = plan.cost_model(c, cfg, mesh)
    times = plan.step_times(costs, slice_.chip, mesh.devices)
    bf16_weights = 2 * plan.param_count(cfg)  # tensor=1: the gathered copy is the whole model
    if reshard:
        assert costs.decode_step_ici_bytes == 0
    else:
        assert costs.decode_step_ici_bytes == pytest.approx(bf16_weights * 31 / 32)
    per_step = max(costs.decode_step_bytes / slice_.chip.hbm_bandwidth,
                   costs.decode_flops / costs.decode_steps / (mesh.devices * slice_.chip.peak_flops),
                   costs.decode_step_ici_bytes / 200e9)
    assert times.decode_roofline == pytest.approx(costs.decode_steps * per_step)


@pytest.mark.parametrize("slice_name", ["v5p-8", "v5e-8"])
def test_sampling_passes_cost_one_decode_loop_each(slice_name):
    """rollout.sample_batch_size=32 of 128 prompts: 4 sampler calls, each a decode loop of
    max_new_tokens steps over 32 x 8 rows. Per step the bytes (weights + that pass's cache) and
    the memory are those of a 32-prompt step; the decode takes 4 such loops, while the FLOPs and
    tokens of the RL step stay those of the 128 prompts."""
    slice_ = plan.parse_slice(slice_name)
    cfg = M.Qwen2Config(**plan.KNOWN_MODELS["Qwen/Qwen2.5-Math-1.5B"])
    whole, passes, small = (_math_config(**kw) for kw in (
        {}, dict(sample_batch_size=32), dict(prompts_per_step=32)))
    mesh = plan.resolve_mesh(whole.mesh, slice_)
    cost = {k: plan.cost_model(c, cfg, mesh) for k, c in
            (("whole", whole), ("passes", passes), ("small", small))}
    times = {k: plan.step_times(v, slice_.chip, mesh.devices) for k, v in cost.items()}
    assert (cost["whole"].decode_steps, cost["passes"].decode_steps) == (3000, 4 * 3000)
    assert cost["passes"].decode_flops == cost["whole"].decode_flops
    assert cost["passes"].prefill_flops == cost["whole"].prefill_flops
    assert cost["passes"].sampled_tokens == cost["whole"].sampled_tokens
    assert cost["passes"].decode_step_bytes == cost["small"].decode_step_bytes
    assert cost["passes"].decode_step_bytes < cost["whole"].decode_step_bytes
    assert times["passes"].decode_roofline == pytest.approx(4 * times["small"].decode_roofline)
    # fewer rows per step read the same weights: 4 passes take longer than one pass of all rows
    assert times["passes"].decode_roofline > times["whole"].decode_roofline

    def sampler(c):
        return [i for i in plan.memory_plan(c, cfg, mesh) if i.phase.startswith("sampling")]

    assert sampler(passes) == sampler(small)
    assert sum(i.bytes for i in sampler(passes)) < sum(i.bytes for i in sampler(whole))


def test_the_continuous_engine_is_planned_by_its_slots():
    """rollout.engine=continuous with 64 slots per batch shard on a v5p-8 (4 shards): 256 slots
    for 1024 rows. Decode steps: max_new_tokens for the last rows to drain, plus the queue of
    768 rows at an assumed mean of PACKED_RESPONSE_FRACTION x 3000 tokens over 256 slots; each
    step runs (and reads the cache of) 256 slots, not 1024 rows; the decode's memory is that
    of the slots plus the prompts' own cache (prompt slots only), which the slots copy from."""
    slice_ = plan.parse_slice("v5p-8")
    cfg = M.Qwen2Config(**plan.KNOWN_MODELS["Qwen/Qwen2.5-Math-1.5B"])
    static, cont = _math_config(), _math_config(engine="continuous", slots=64)
    mesh = plan.resolve_mesh(static.mesh, slice_)
    assert mesh.batch_shards == 4
    s = plan.rollout_shapes(cont)
    assert s.decode_rows(4) == 256
    steps = 3000 + math.ceil(768 * plan_tables.PACKED_RESPONSE_FRACTION * 3000 / 256)
    costs = {k: plan.cost_model(c, cfg, mesh) for k, c in (("static", static), ("cont", cont))}
    assert costs["cont"].decode_steps == steps
    assert costs["cont"].decode_step_bytes < costs["static"].decode_step_bytes

    def decode_items(c):
        return {i.name: i.bytes for i in plan.memory_plan(c, cfg, mesh) if i.phase == "sampling: decode"}

    ours, theirs = decode_items(cont), decode_items(static)
    assert ours["KV cache"] == pytest.approx(theirs["KV cache"] / 4)
    assert "prompt KV cache (the slots copy from it)" in ours
    # Slots past the rows are the rows; the static engine's passes are not the continuous one's.
    assert plan.rollout_shapes(_math_config(engine="continuous", slots=4096)).decode_rows(4) == 1024
    with pytest.raises(ValueError, match="bounds memory by rollout.slots"):
        plan.rollout_shapes(_math_config(engine="continuous", slots=64, sample_batch_size=32))


def test_sample_batch_size_must_divide_the_prompts():
    with pytest.raises(ValueError, match="sample_batch_size=48 must divide"):
        plan.rollout_shapes(_math_config(sample_batch_size=48))


def test_remat_orders_the_activation_estimate():
    cfg = M.Qwen2Config(**plan.KNOWN_MODELS["Qwen/Qwen2.5-Math-1.5B"])
    model = plan.Model(cfg, plan.MeshPlan((1, 8, 1), (1, 1, 1), 8), "bfloat16", "float32")
    none, dots, full = (model.activations(1, 4024, r) for r in ("none", "dots_saveable", "full"))
    assert none > dots > full
    assert full < none / 10  # full remat keeps one [T, hidden] per layer, not 28 layers' working sets


@pytest.mark.parametrize("remat", ["none", "dots_saveable", "full"])
def test_saved_residuals_per_layer_are_what_jax_saves(remat):
    """The plan's per-layer residuals against JAX's own list of what the backward pass keeps, for
    the scanned decoder layers as the model runs them off-CPU (qwen2.py: lax.scan over the
    stacked weights, each step under the remat policy), GQA, bf16 compute: the residuals of
    4 layers minus those of 3 (JAX keeps the broadcast mask's float32 fill once from 3 layers
    on, whatever their number)."""
    from jax._src.ad_checkpoint import saved_residuals

    from sspo_jax.model.attention import xla_attention
    from sspo_jax.model.layers import decoder_layer
    from sspo_jax.model.qwen2 import REMAT_POLICIES, layer_param_specs
    b, t = 2, 96
    cfg = tiny(hidden_size=128, intermediate_size=320, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32)
    layer = functools.partial(decoder_layer, num_heads=4, num_kv_heads=2, head_dim=32,
                              eps=1e-6, dtype=jnp.bfloat16)
    shape = jax.ShapeDtypeStruct

    def residual_bytes(layers):
        params = {name: shape((layers, *s), jnp.float32) for name, (s, _) in layer_param_specs(cfg).items()}

        def step(x, p, cos, sin, segments):
            return layer(p, x, cos, sin, lambda q, k, v: (xla_attention(q, k, v, segments), None))[0]

        if remat != "none":
            step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)

        def forward(params, x):
            # Rotary tables and segments are constants, as in the model (no gradient flows to them).
            cos, sin = jnp.ones((b, t, 1, 16)), jnp.zeros((b, t, 1, 16))
            segments = jnp.ones((b, t), jnp.int32)
            out, _ = jax.lax.scan(lambda x, p: (step(x, p, cos, sin, segments), None), x, params)
            return out.astype(jnp.float32).sum()

        saved = saved_residuals(forward, params, shape((b, t, 128), jnp.bfloat16))
        return sum(a.size * a.dtype.itemsize for a, why in saved if "argument" not in why)

    model = plan.Model(cfg, plan.MeshPlan((1, 1, 1), (1, 1, 1), 1), "bfloat16", "float32", "xla")
    assert residual_bytes(4) - residual_bytes(3) == model.saved_per_layer(b, t, remat)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_activation_estimate_brackets_xla_cpu_temporaries(remat):
    """XLA's own count of the temporaries of a training forward + backward on CPU (one device,
    float32) lies between 0.5x and 1.25x of the plan's activations + chunked log-prob head:
    the estimate is conservative, not wild."""
    cfg = tiny(vocab_size=2000, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    b, t, r = 4, 512, 384
    graphdef, params = nnx.split(nnx.eval_shape(lambda: M.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), remat=remat)))

    def loss(params, tokens):
        m = nnx.merge(graphdef, params)
        logp, _ = update.response_logprobs(m, tokens, jnp.ones_like(tokens), t - r, 1.0, 128)
        return logp.sum()

    lowered = jax.jit(jax.grad(loss)).lower(params, jax.ShapeDtypeStruct((b, t), jnp.int32))
    # No LLVM optimisation: the buffer assignment is the same, the compile 2x faster.
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0,
                                                 "xla_llvm_disable_expensive_passes": True})
    xla = compiled.memory_analysis().temp_size_in_bytes
    model = plan.Model(cfg, plan.MeshPlan((1, 1, 1), (1, 1, 1), 1), "float32", "float32", "xla")
    ours = model.activations(b, t, remat) + model.logprob_head(b, r, 128, grad=True)
    assert 0.5 < xla / ours < 1.25, (xla, ours)


@pytest.mark.parametrize("prompts,prompt_len,new_tokens", [(4, 256, 768), (16, 128, 512)])
def test_sampler_estimate_brackets_xla_cpu_temporaries(prompts, prompt_len, new_tokens):
    """XLA's count of the temporaries of one sampler call (compile only, CPU, one device, bf16
    compute, 8 samples per prompt), compiled as it runs off CPU (the layers scanned, the KV cache
    a scan carry; on CPU the sampler unrolls the layers over per-layer weight copies instead), is
    within 0.8x-1.3x of the plan's larger sampler phase (the TPU code path with XLA attention)."""
    from sspo_jax.generate import sampler
    cfg = tiny(vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: M.Qwen2ForCausalLM(
        cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32, platform="tpu", attention="xla")))
    scfg = sampler.make_config(cfg.vocab_size, max_new_tokens=new_tokens, num_samples=8, pad_id=0,
                                eos_ids=(1,))
    ids = jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32)
    compiled = sampler._generate_jit.lower(graphdef, scfg, params, ids, ids, jax.random.key(0)).compile(
        compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    xla = compiled.memory_analysis().temp_size_in_bytes
    model = plan.Model(cfg, plan.MeshPlan((1, 1, 1), (1, 1, 1), 1), "bfloat16", "float32", "xla")
    items = plan_memory._sampler_items(model, "sampling", prompts, 8, prompt_len, new_tokens, False, "x")
    ours = max(sum(i.bytes for i in items if i.phase == phase)
               for phase in ("sampling: prefill", "sampling: decode"))
    assert 0.8 < xla / ours < 1.3, (xla, ours)


def test_report_flags_what_does_not_fit_or_split():
    def report(config_file, slice_name, **overrides):
        import importlib.util
        spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", config_file))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config("sspo")
        c.mesh.data, c.mesh.fsdp = 1, -1
        for key, value in overrides.items():
            section, field = key.split("__")
            c[section][field] = value
        return plan.render(c, config_file, plan.parse_slice(slice_name))

    fits = report("qwen2_5_math_1_5b.py", "v5p-8")
    assert "**FITS**" in fits and "Qwen/Qwen2.5-Math-1.5B" in fits
    small = report("qwen2_5_math_1_5b.py", "v5e-8")
    # The continuous engine (the config's): fewer slots is the fix, and fits.
    assert "**DOES NOT FIT**" in small and "KV cache" in small and "a smaller rollout.slots" in small
    assert "**FITS**" in report("qwen2_5_math_1_5b.py", "v5e-8", rollout__prompts_per_step=32)
    slots = report("qwen2_5_math_1_5b.py", "v5e-8", rollout__slots=64)
    assert "**FITS**" in slots and "a continuous pool of 512 slots" in slots
    assert "| sampling: decode, continuous, " in slots and "steps of 512 slots |" in slots
    # The static engine: passes.
    static = dict(rollout__engine="static", rollout__slots=0)
    assert "rollout.sample_batch_size" in report("qwen2_5_math_1_5b.py", "v5e-8", **static)
    passes = report("qwen2_5_math_1_5b.py", "v5e-8", rollout__sample_batch_size=32, **static)
    assert "**FITS**" in passes and "sampled in 4 passes of 32 prompts" in passes
    assert "| sampling: decode, 4 x 3000 steps |" in passes
    wide = report("qwen2_5_math_1_5b.py", "v5p-64")
    assert "does not split over the 32 batch shards" in wide
    assert "does not split" not in report("qwen2_5_math_1_5b.py", "v5p-64", train__micro_batch_size=32)


def run_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "sspo_jax.plan", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)


def test_cli_on_the_demo_and_the_1p5b_config():
    demo = run_cli("--config=configs/demo.py", "--slice=v5e-8", "--noitems")
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "tiny demo model" in demo.stdout and "| training |" in demo.stdout
    assert "| state |" not in demo.stdout  # --noitems: phase totals only
    assert "**FITS**" in demo.stdout and "## Cost per RL step" in demo.stdout
    big = run_cli("--config=configs/qwen2_5_math_1_5b.py:sspo", "--slice=v5p-8",
                  "--config.mesh.data=1", "--config.mesh.fsdp=4")
    assert big.returncode == 0, big.stderr[-2000:]
    assert "mesh.fsdp=4" in big.stdout and "data=1 fsdp=4 tensor=1" in big.stdout
    for piece in ["| sampling: decode | KV cache |", "activations (remat=full)", "| state | parameters (float32) |",
                  "| training (model FLOPs) |", "**total**"]:
        assert piece in big.stdout, piece


def test_cli_unknown_slice():
    proc = run_cli("--config=configs/demo.py", "--slice=v9-8")
    assert proc.returncode != 0
    assert "error: unknown TPU slice 'v9-8'" in proc.stderr and "Traceback" not in proc.stderr


def test_packing_counts_real_tokens():
    """With train.packing the trained tokens are the prompt plus the assumed mean response, and
    the training FLOPs and time shrink by about that ratio; executed attention is the packed
    rows' whole squares."""
    c = _math_config()
    cfg = M.Qwen2Config(**plan.KNOWN_MODELS["Qwen/Qwen2.5-Math-1.5B"])
    mesh = plan.resolve_mesh(c.mesh, plan.parse_slice("v5p-8"))
    padded = plan.cost_model(c, cfg, mesh)
    c.train.packing = True
    packed = plan.cost_model(c, cfg, mesh)
    s = plan.rollout_shapes(c)
    real = s.prompt_len + plan_tables.PACKED_RESPONSE_FRACTION * s.new_tokens
    assert packed.trained_tokens == int(s.rows * real) * c.train.ppo_epochs
    ratio = padded.train_model_flops / packed.train_model_flops
    assert 0.8 * s.seq / real < ratio < 1.3 * s.seq / real
    assert packed.train_flops > packed.train_model_flops  # remat + the packed rows' attention squares
    assert packed.sampled_tokens == padded.sampled_tokens  # the sampler is not packed
