"""Packed (padding-free) rows give the padded update: loss, gradients and metrics.

The reference is the padded path (`update._micro_loss` on the PolicyBatch), itself tested against
PyTorch and float64 loops. Batches are ragged: left-padded prompts of 1-6 tokens, responses of
0 (empty: no loss token), 1, ..., R (at the budget) tokens. Tolerance: 2e-5 relative to the
largest value compared (float32 sums in another order).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sspo_jax import model as M
from sspo_jax import parallel
from sspo_jax.rl import losses, packing, segments, train_batch
from sspo_jax.rl.loss_metrics import finalize_metrics
from sspo_jax.train import update as PU

P, R, V = 6, 10, 97
PROMPTS = [3, 6, 5, 1, 6, 4, 2, 6]
RESPONSES = [10, 5, 0, 8, 3, 1, 7, 2]  # 10 = R: a response at the budget; 0: empty
REL_TOL = 2e-5
PRESETS = ["grpo", "dapo", "dr_grpo", "gspo", "sspo", "sspo_fixed"]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


@functools.lru_cache(maxsize=None)
def _model():
    cfg = M.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        max_position_embeddings=64, tie_word_embeddings=False)
    return nnx.split(M.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(3)))


def _batch(loss_cfg, seed=0, prompts=PROMPTS, responses=RESPONSES, kl=False) -> train_batch.PolicyBatch:
    rng = np.random.default_rng(seed)
    b = len(prompts)
    tokens = rng.integers(1, V, (b, P + R)).astype(np.int32)
    cols = np.arange(P + R)
    attn = ((cols[None] >= P - np.asarray(prompts)[:, None]) & (cols[None] < P + np.asarray(responses)[:, None]))
    tokens = np.where(attn, tokens, 0)
    resp_mask = attn[:, P:].astype(np.int32)
    table = np.zeros(V, bool)
    table[rng.choice(V, 15, replace=False)] = True  # "punctuation": subsentence ends
    seg = segments.segment_ids(jnp.asarray(tokens[:, P:]), jnp.asarray(resp_mask), jnp.asarray(table))
    entropy = jnp.asarray(rng.random((b, R)), jnp.float32)
    lo, hi = losses.clip_bounds(loss_cfg, jnp.asarray(resp_mask), seg, entropy)
    return train_batch.PolicyBatch(
        tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn.astype(np.int32)),
        response_mask=jnp.asarray(resp_mask), old_logp=jnp.asarray(-rng.random((b, R)) * 4 - 1, jnp.float32),
        adv=jnp.asarray(rng.standard_normal(b), jnp.float32), seg=seg, eps_low=lo, eps_high=hi,
        ref_logp=jnp.asarray(-rng.random((b, R)) * 4 - 1, jnp.float32) if kl else None)


def _settings(loss_cfg, mbs):
    return PU.UpdateSettings(loss=loss_cfg, temperature=0.8, micro_batch_size=mbs, logprob_chunk=4,
                             response_len=R)


def _padded(pb, loss_cfg):
    graphdef, params = _model()
    mask = pb.response_mask.astype(jnp.float32)
    n_tok, n_seq = jnp.sum(mask), jnp.sum(jnp.sum(mask, 1) > 0)
    f = jax.jit(jax.value_and_grad(lambda p: PU._micro_loss(p, graphdef, pb, n_tok, n_seq,
                                                            _settings(loss_cfg, pb.num_rows)), has_aux=True))
    (loss, metrics), grads = f(params)
    return loss, finalize_metrics(metrics), grads


def _packed(packed, loss_cfg, n_seq):
    graphdef, params = _model()
    n_tok = jnp.sum(packed.response_mask.astype(jnp.float32))
    f = jax.jit(jax.value_and_grad(lambda p: PU._packed_micro_loss(p, graphdef, packed, n_tok, n_seq,
                                                                   _settings(loss_cfg, packed.num_rows)),
                                   has_aux=True))
    (loss, metrics), grads = f(params)
    return loss, finalize_metrics(metrics), grads


def _assert_same(got, want):
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = got, want
    assert _rel(loss_a, loss_b) < REL_TOL, (float(loss_a), float(loss_b))
    assert set(metrics_a) == set(metrics_b)
    for k in metrics_b:
        assert _rel(metrics_a[k], metrics_b[k]) < REL_TOL, (k, metrics_a[k], metrics_b[k])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree.leaves(grads_b)):
        assert np.abs(np.asarray(b)).max() > 0
        assert _rel(a, b) < REL_TOL, jax.tree_util.keystr(path)


def test_plan_places_every_real_token_once_without_overlap():
    lengths = np.array([5, 0, 9, 3, 9, 1])
    starts = np.array([2, 0, 0, 4, 1, 7])
    layout = packing.plan(lengths, starts, padded_len=10, rows_multiple=2)
    src = layout.source[layout.source >= 0]
    want = np.concatenate([i * 10 + starts[i] + np.arange(n) for i, n in enumerate(lengths)])
    np.testing.assert_array_equal(np.sort(src), np.sort(want))
    assert layout.source.shape == (4, 10)  # 27 tokens: FFD needs 3 rows of 10, bucketed to 4 = 2 x 2
    assert layout.real_tokens == 27 and layout.sequences == 5
    for r in range(layout.source.shape[0]):  # each sequence contiguous, numbered 1.. in its row
        seg = layout.segment_ids[r]
        for k in range(1, seg.max() + 1):
            slots = np.flatnonzero(seg == k)
            assert (np.diff(slots) == 1).all() and (np.diff(layout.source[r, slots]) == 1).all()
    with pytest.raises(ValueError, match="does not fit packed rows of 8 slots"):
        packing.plan(lengths, starts, padded_len=10, row_len=8)


def test_packing_never_makes_more_rows_than_the_padded_batch():
    """Sequences that do not pack (each fills a row) bucket to at most the padded row count,
    rounded to the multiple."""
    for b, multiple in ((72, 8), (9, 4), (5, 8)):
        layout = packing.plan(np.full(b, 10), np.zeros(b), padded_len=10, rows_multiple=multiple)
        assert layout.source.shape[0] == max(multiple, -(-b // multiple) * multiple)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 9, 13, 24, 25, 33, 65, 70, 130])
def test_bucketed_rows_are_few_and_multiples(rows):
    n = packing.bucket_rows(rows, 4)
    assert n >= rows and n % 4 == 0
    units = n // 4
    assert units in {*range(1, 17), *range(18, 33, 2), *range(36, 65, 4)}
    assert n <= 1.125 * (-(-rows // 4) * 4)  # at most 1/8 padding rows beyond the multiple


def test_eight_bucket_sizes_per_doubling():
    assert len({packing.bucket_rows(r, 4) for r in range(4 * 16 + 1, 4 * 32 + 1)}) == 8
    # Four sizes per doubling made these 40 rows (BENCHMARKS.md, "Padding-free update").
    assert packing.bucket_rows(33, 4) == 36


@pytest.mark.parametrize("kl", [False, True], ids=["no_kl", "kl"])
@pytest.mark.parametrize("preset", PRESETS)
def test_packed_loss_gradients_and_metrics_equal_the_padded(preset, kl):
    loss_cfg = losses.preset(preset, kl_beta=0.05 if kl else 0.0)
    pb = _batch(loss_cfg, kl=kl)
    layout = packing.plan_batch(pb)
    assert layout.padding_fraction < 0.5  # really packed: 8 padded rows of 16 -> fewer rows
    packed = packing.pack(pb, layout)
    _assert_same(_packed(packed, loss_cfg, layout.sequences), _padded(pb, loss_cfg))


@pytest.mark.parametrize("group_rows", [0, 1, 2, 4])
def test_the_head_on_the_loss_tokens_only_gives_the_padded_result(group_rows, monkeypatch):
    """The LM head on each group's loss tokens (gathered, bucketed slots), or on every slot
    (group_rows 0): the padded update's loss, gradients and metrics, KL term included. Head
    slots in units of 1, so the fullest group has next to no spare slot: a host count below
    the device's would drop loss tokens."""
    monkeypatch.setattr(packing, "HEAD_SLOT_UNIT", 1)
    loss_cfg = losses.preset("sspo", kl_beta=0.05)
    pb = _batch(loss_cfg, seed=5, kl=True)
    layout = packing.plan_batch(pb, rows_multiple=4, head_group_rows=group_rows)
    packed = packing.pack(pb, layout)
    assert (packed.head_pos is None) == (group_rows == 0)
    if group_rows:
        pos = np.asarray(packed.head_pos).reshape(-1, group_rows * (P + R))
        assert ((pos >= 0) == (np.asarray(packed.response_mask).reshape(pos.shape) > 0)).all()
        fullest = int((pos >= 0).sum(1).max())  # the device's count
        assert layout.head_slots == min(packing.bucket_rows(fullest, 1, packing.HEAD_BUCKET_STEPS),
                                        group_rows * (P + R))
    _assert_same(_packed(packed, loss_cfg, layout.sequences), _padded(pb, loss_cfg))
    if group_rows == 4:  # a micro-batch must hold whole groups
        graphdef, params = _model()
        opt = PU.make_optimizer(1e-3)
        with pytest.raises(ValueError, match="whole head groups of 4 rows"):
            PU.update_step(params, PU.init_optimizer(opt, params), packed, graphdef=graphdef,
                           optimizer=opt, settings=_settings(loss_cfg, 2))


def test_a_response_without_a_prompt_is_refused():
    loss_cfg = losses.preset("grpo")
    pb = _batch(loss_cfg, prompts=[3, 0, 5, 1, 6, 4, 2, 6])
    with pytest.raises(ValueError, match=r"rows \[1\] have a response but no prompt token"):
        packing.plan_batch(pb)


def test_rows_are_dealt_to_the_head_groups_evenly():
    """Loss tokens 44, 38, 32, 26 in four rows, groups of two: {44, 26} and {38, 32}, so the
    head needs 70 slots per group (in 16s at four sizes per doubling: 80), not 82 (96)."""
    lengths = np.array([46, 40, 34, 28])  # no two share a row of 48
    layout = packing.plan(lengths, np.zeros(4, np.int64), padded_len=48, rows_multiple=4,
                          loss_tokens=lengths - 2, group_rows=2)
    loads = [sorted(np.unique(layout.row_of[r][layout.row_of[r] >= 0]).tolist()) for r in range(4)]
    assert sorted([loads[0] + loads[1], loads[2] + loads[3]]) == [[0, 3], [1, 2]]
    assert layout.head_slots == 80
    with pytest.raises(ValueError, match="group size"):
        packing.plan(lengths, np.zeros(4, np.int64), padded_len=48, rows_multiple=4,
                     loss_tokens=lengths - 2, group_rows=3)


def test_packing_order_and_row_length_do_not_change_the_result():
    loss_cfg = losses.preset("sspo")
    pb = _batch(loss_cfg, seed=1)
    want = _padded(pb, loss_cfg)
    reverse = packing.plan_batch(pb, order=np.arange(pb.num_rows)[::-1])
    wide = packing.plan_batch(pb, row_len=2 * (P + R), rows_multiple=2)
    for layout in (reverse, wide):
        _assert_same(_packed(packing.pack(pb, layout), loss_cfg, layout.sequences), want)


@pytest.mark.parametrize("mbs", [1, 2])
def test_packed_update_step_is_invariant_to_micro_batches(mbs):
    """The whole update (micro-batch accumulation, AdamW) on packed rows: its metrics and the
    gradient norm equal the padded update's, for any number of packed rows per micro-batch."""
    loss_cfg = losses.preset("sspo")
    pb = _batch(loss_cfg, seed=2)
    graphdef, params = _model()
    opt = PU.make_optimizer(1e-3)

    def step(batch, settings):
        p = jax.tree.map(jnp.copy, params)
        return PU.update_step(p, PU.init_optimizer(opt, p), batch, graphdef=graphdef, optimizer=opt,
                              settings=settings)

    _, _, m_pad, g_pad, _ = step(pb, _settings(loss_cfg, 4))
    layout = packing.plan_batch(pb, rows_multiple=mbs)
    _, _, m_pack, g_pack, finite = step(packing.pack(pb, layout), _settings(loss_cfg, mbs))
    assert bool(finite)
    assert _rel(g_pack, g_pad) < REL_TOL
    a, b = finalize_metrics(m_pack), finalize_metrics(m_pad)
    for k in b:
        assert _rel(a[k], b[k]) < REL_TOL, k


def test_packed_logprobs_unpack_to_the_padded_ones():
    """batch_logprobs (the recomputed old / reference log-probs) on the packed layout, put back
    at the padded slots, equal the padded computation."""
    loss_cfg = losses.preset("grpo")
    pb = _batch(loss_cfg, seed=3)
    graphdef, params = _model()
    settings = _settings(loss_cfg, 2)
    want = PU.batch_logprobs(params, pb, graphdef=graphdef, settings=settings)
    layout = packing.plan_batch(pb, rows_multiple=2)
    packed = packing.pack(pb, layout)
    got = packing.unpack(PU.batch_logprobs(params, packed, graphdef=graphdef, settings=settings),
                         layout, pb.tokens.shape)[:, P:]
    assert _rel(got, want) < REL_TOL


def test_packed_update_on_a_2x2x2_mesh_equals_one_device():
    loss_cfg = losses.preset("gspo")
    pb = _batch(loss_cfg, seed=4)
    graphdef, params = _model()
    opt = PU.make_optimizer(1e-3)
    settings = _settings(loss_cfg, 4)
    # Head groups of one row: a micro-batch of 4 rows over the mesh's 4 batch shards.
    layout = packing.plan_batch(pb, rows_multiple=4, head_group_rows=1)
    one = PU.update_step(jax.tree.map(jnp.copy, params), PU.init_optimizer(opt, params),
                         packing.pack(pb, layout), graphdef=graphdef, optimizer=opt, settings=settings)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))
    parallel.shard_model(model, mesh)
    g_mesh, p_mesh = nnx.split(model)
    pb_mesh = jax.tree.map(lambda x: jax.device_put(
        x, parallel.named_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape)), pb)
    packed = packing.pack(pb_mesh, layout, mesh=mesh)
    assert packed.tokens.sharding.spec[0] == ("data", "fsdp")
    sharded = PU.update_step(p_mesh, PU.init_optimizer(opt, p_mesh), packed, graphdef=g_mesh,
                             optimizer=opt, settings=settings)
    assert _rel(sharded[3], one[3]) < REL_TOL
    a, b = finalize_metrics(sharded[2]), finalize_metrics(one[2])
    for k in b:
        assert _rel(a[k], b[k]) < REL_TOL, k


def test_batches_of_one_bucket_compile_one_update():
    """Mini-batches whose packed row counts round to the same bucket reuse one program."""
    loss_cfg = losses.preset("grpo")
    graphdef, params = _model()
    opt = PU.make_optimizer(1e-3)
    counts = []
    for responses in ([10, 5, 0, 8, 3, 1, 7, 2], [9, 6, 2, 8, 4, 1, 7, 3], [1, 1, 1, 1, 1, 1, 1, 1]):
        pb = _batch(loss_cfg, responses=responses)
        layout = packing.plan_batch(pb, rows_multiple=2)
        before = PU.compile_count()
        PU.update_step(jax.tree.map(jnp.copy, params), PU.init_optimizer(opt, params),
                       packing.pack(pb, layout), graphdef=graphdef, optimizer=opt,
                       settings=_settings(loss_cfg, 2))
        counts.append((layout.source.shape[0], PU.compile_count() - before))
    (rows_a, first), (rows_b, second), (rows_c, third) = counts
    assert rows_a == rows_b and second == 0  # same bucket: no new program
    assert rows_c < rows_a and third == 1    # short responses: fewer packed rows, one more program
