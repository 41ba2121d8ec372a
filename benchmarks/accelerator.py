"""The accelerator benchmarks (run by benchmarks/device_check.sh on a GPU), each against a peer
timed in the same run, printed as markdown tables (and written as JSON with --json).

    python benchmarks/accelerator.py [--parts attention,update,decode,engine] [--tiny] [--json FILE]

- attention: forward + backward of causal GQA attention with segment ids (two packed sequences
  per row), bfloat16: `cudnn` and `xla` (the model's implementations) and PyTorch's
  `scaled_dot_product_attention` on the same shapes; ms and XLA's temporary bytes.
- update: one policy update (forward, token log-probs, GRPO loss, backward, AdamW) of a random
  Qwen2.5-Math-1.5B-sized model, bfloat16 compute, float32 parameters, attention `cudnn` vs
  `xla`; MFU from model FLOPs (6 N per token + causal attention) over --peak-tflops.
- decode: the sampler's greedy decode at the same size, bfloat16: ms per step against
  transformers' generate on the same weights (its static cache), and the fraction of the HBM
  roofline (weights + KV cache read once per step) at --peak-gbs.

--tiny shrinks every shape so the script runs anywhere (CPU: no cudnn rows); its numbers mean
nothing. Defaults for the peaks: the H200's bf16 dense 989 TFLOP/s and 4.8 TB/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

QWEN_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True,
                 max_position_embeddings=4096, rope_theta=10000.0)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
            max_position_embeddings=512, rope_theta=10000.0)


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls after one warm call (fn blocks until its result is ready)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows])


# ---------------------------------------------------------------- attention

def attention_rows(args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from sspo_jax.model import attention as A
    shapes = ([(2, 256, 4, 2, 64)] if args.tiny else
              [(4, 4096, 12, 2, 128), (2, 4096, 28, 4, 128), (16, 1024, 12, 2, 128)])
    impls = {"xla": A.xla_attention}
    if jax.default_backend() == "gpu":
        impls["cudnn"] = A.cudnn_attention
    rows = []
    for b, t, nq, hkv, d in shapes:
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((b, t, nq, d)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.bfloat16) for _ in range(2))
        seg = np.ones((b, t), np.int32)
        seg[:, t // 3:] = 2  # two packed sequences per row
        seg = jnp.asarray(seg)
        row = {"shape (B, T, heads/kv, D)": f"{b}, {t}, {nq}/{hkv}, {d}"}
        for name, fn in impls.items():
            def loss(q, k, v, fn=fn):
                return jnp.sum(fn(q, k, v, seg).astype(jnp.float32))
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            compiled = step.lower(q, k, v).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            row[f"{name} ms"] = 1e3 * timed(lambda: jax.block_until_ready(compiled(q, k, v)), args.reps)
            row[f"{name} temp GiB"] = temp / 2 ** 30
        torch_ms = _torch_attention_ms(b, t, nq, hkv, d, args.reps)
        if torch_ms is not None:
            row["torch sdpa ms"] = torch_ms
        if "cudnn ms" in row:
            row["xla / cudnn"] = row["xla ms"] / row["cudnn ms"]
        rows.append(row)
        print(table([row]), flush=True)
    return rows


def _torch_attention_ms(b, t, nq, hkv, d, reps) -> float | None:
    """PyTorch's fused causal attention, fwd + bwd, bf16, one sequence per row (its flash kernel
    takes no segment ids): None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    q = torch.randn(b, nq, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.float().sum().backward()
        torch.cuda.synchronize()

    return 1e3 * timed(step, reps)


# ---------------------------------------------------------------- update

def update_rows(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sspo_jax import model as M
    from sspo_jax.rl import losses, train_batch
    from sspo_jax.train import update as PU
    cfg = M.Qwen2Config(**(TINY if args.tiny else QWEN_1_5B))
    b, p, r = (4, 32, 64) if args.tiny else (args.update_rows, 512, 1536)
    impls = ["xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, p + r)), jnp.int32)
    batch = train_batch.PolicyBatch(
        tokens=tokens, attention_mask=jnp.ones_like(tokens), response_mask=jnp.ones((b, r), jnp.int32),
        old_logp=jnp.asarray(-rng.random((b, r)) * 5, jnp.float32),
        adv=jnp.asarray(rng.standard_normal(b), jnp.float32),
        seg=jnp.arange(b * r, dtype=jnp.int32).reshape(b, r),
        eps_low=jnp.full((b, r), 0.2), eps_high=jnp.full((b, r), 0.2))
    settings = PU.UpdateSettings(loss=losses.preset("grpo"), temperature=1.0,
                                 micro_batch_size=args.micro_batch, logprob_chunk=256)
    t = p + r
    layers, head = _matmul_params(cfg)
    # model FLOPs: 6 N per token for the layers, the head on the response only, and causal
    # attention: QK^T and PV over the lower triangle, 2 x 2 nq d t^2 / 2 forward, x 3 with backward
    flops = 6 * b * (layers * t + head * r) + 3 * b * cfg.num_hidden_layers * (
        2 * cfg.num_attention_heads * cfg.head_dim * t * t)
    rows = []
    for impl in impls:
        model = M.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                   remat=args.remat, attention=impl)
        graphdef, params = nnx.split(model)
        del model
        opt = PU.make_optimizer(1e-6)
        opt_state = PU.init_optimizer(opt, params)
        state = {"params": params, "opt": opt_state}

        def step():
            state["params"], state["opt"], _, gnorm, _ = PU.update_step(
                state["params"], state["opt"], batch, graphdef=graphdef, optimizer=opt, settings=settings)
            gnorm.block_until_ready()

        t0 = time.perf_counter()
        step()
        compile_s = time.perf_counter() - t0
        sec = timed(step, args.reps)
        rows.append({"attention": impl, "rows x tokens": f"{b} x {t}", "remat": args.remat,
                     "compile s": compile_s, "step s": sec, "tokens/s": b * t / sec,
                     "MFU": flops / sec / (args.peak_tflops * 1e12)})
        print(table(rows[-1:]), flush=True)
        state.clear()  # free this attention path's weights and moments before the next
        del params, opt_state
    return rows


def _matmul_params(cfg) -> tuple[int, int]:
    """(weights of all decoder-layer matmuls, LM head weights)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * i), h * cfg.vocab_size


# ---------------------------------------------------------------- decode

def decode_rows(args) -> list[dict]:
    import tempfile

    import jax
    import jax.numpy as jnp

    from sspo_jax import model as M
    from sspo_jax.generate import sampler
    raw = TINY if args.tiny else QWEN_1_5B
    cfg = M.Qwen2Config(**raw)
    b, p, n = (4, 16, 32) if args.tiny else (args.decode_rows, 256, 256)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        hf = _save_random_hf(raw, d)
        model = M.from_pretrained(d, dtype=jnp.bfloat16)
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (b, p)).astype(np.int32)
    mask = np.ones_like(ids)

    def ours(new):
        out = sampler.generate(model, ids, mask, jax.random.key(0), max_new_tokens=new, temperature=0.0,
                               eos_ids=(), pad_id=0)
        jax.block_until_ready(out.tokens)

    t0 = time.perf_counter()
    ours(n)
    compile_s = time.perf_counter() - t0
    step = (timed(lambda: ours(n), args.reps) - timed(lambda: ours(1), args.reps)) / (n - 1)
    n_params = sum(a.size for a in jax.tree.leaves(_params_of(model)))
    kv = 2 * cfg.num_hidden_layers * b * cfg.num_key_value_heads * cfg.head_dim * (p + n) * 2
    roofline_s = (2 * n_params + kv) / (args.peak_gbs * 1e9)  # bf16 weights + the whole cache
    row = {"rows x (prompt + new)": f"{b} x ({p} + {n})", "compile s": compile_s,
           "ours ms/step": 1e3 * step, "HBM roofline": roofline_s / step}
    hf_ms = _hf_decode_ms(hf, ids, n, args.reps)
    if hf_ms is not None:
        row["transformers ms/step"] = hf_ms
        row["transformers / ours"] = hf_ms / (1e3 * step)
    rows.append(row)
    print(table(rows), flush=True)
    return rows


def engine_rows(args) -> list[dict]:
    """The rollout engines on RL-like lengths (benchmarks/sampling.py's skewed workload: lognormal
    lengths, median N/6, the two longest at the budget, forced by the model's decoder): static
    against continuous at two slot counts, bf16, greedy, one device."""
    import tempfile

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sampling import ForcedLengthQwen2, skewed_lengths
    from sspo_jax import model as M
    from sspo_jax.generate import sampler
    raw = TINY if args.tiny else QWEN_1_5B
    rows_n, new = (8, 32) if args.tiny else (args.engine_rows, 512)
    with tempfile.TemporaryDirectory() as d:
        _save_random_hf(raw, d)
        loaded = M.from_pretrained(d, dtype=jnp.bfloat16)
    model = ForcedLengthQwen2(loaded.config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(model, nnx.state(loaded))
    prompt_lens = 16 + np.random.default_rng(1).permutation(rows_n)
    lengths = skewed_lengths(rows_n, new)
    targets = np.full(prompt_lens.max() + 1, new + 1)
    targets[prompt_lens] = np.where(lengths >= new, new + 1, lengths)
    eos = model.config.vocab_size - 1
    model.set_targets(targets, eos, new)
    width = int(prompt_lens.max())
    ids = np.random.default_rng(0).integers(1, eos, (rows_n, width)).astype(np.int32)
    mask = (np.arange(width)[None] >= width - prompt_lens[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    out_rows, static_s = [], None
    for name, kw in (("static", {}), *((f"continuous, {k} slots", dict(engine="continuous", slots=k))
                                       for k in (rows_n // 4, rows_n // 2))):
        def call(kw=kw):
            out = sampler.generate(model, ids, mask, jax.random.key(0), max_new_tokens=new, temperature=0.0,
                                   eos_ids=(eos,), pad_id=0, **kw)
            jax.block_until_ready(out.tokens)
            return out

        t0 = time.perf_counter()
        out = call()
        first = time.perf_counter() - t0
        best = timed(call, args.reps)
        static_s = static_s or best
        tokens = int(np.asarray(out.lengths).sum())
        out_rows.append({"engine": name, "rows x budget": f"{rows_n} x {new}", "first call s": first,
                         "s": best, "real tok/s": tokens / best, "decode steps": int(out.decode_steps),
                         "occupancy": tokens / int(out.slot_steps), "vs static": static_s / best})
    print(table(out_rows), flush=True)
    return out_rows


def _params_of(model):
    from flax import nnx
    return nnx.state(model, nnx.Param)


def _save_random_hf(raw: dict, out_dir: str):
    """A random transformers Qwen2 of this config saved to out_dir (bf16): the same weights for
    both sides."""
    import torch
    import transformers
    config = transformers.Qwen2Config(**raw, torch_dtype="bfloat16")
    torch.manual_seed(0)
    # Initialised on the GPU when there is one (1.5B random weights on the host take a minute).
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        hf = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    hf.save_pretrained(out_dir)
    return hf


def _hf_decode_ms(hf, ids, n, reps) -> float | None:
    """transformers' greedy generate (static cache, sdpa) ms per new token on CUDA; None without."""
    import torch
    if not torch.cuda.is_available():
        return None
    hf = hf.to("cuda").eval()
    t_ids = torch.from_numpy(ids).long().to("cuda")

    def gen(new):
        with torch.no_grad():
            hf.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static",
                        disable_compile=True)  # eager: a torch.compile would eat the time budget
        torch.cuda.synchronize()

    return 1e3 * (timed(lambda: gen(n), reps) - timed(lambda: gen(1), reps)) / (n - 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="attention,update,decode")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--update-rows", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--decode-rows", type=int, default=64)
    ap.add_argument("--engine-rows", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--peak-gbs", type=float, default=4800.0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    import jax
    print(f"# accelerator benchmarks: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}", flush=True)
    results = {}
    for part in args.parts.split(","):
        print(f"\n## {part}\n", flush=True)
        results[part] = {"attention": attention_rows, "update": update_rows, "decode": decode_rows,
                         "engine": engine_rows}[part](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
