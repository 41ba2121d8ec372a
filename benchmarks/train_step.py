"""One policy-gradient update, sspo_jax vs PyTorch + transformers, on the same weights and batch.

    python benchmarks/train_step.py [--sizes 5m,40m] [--reps 5] [--demo-steps 6]
    python benchmarks/train_step.py --workload skewed [--rows 64 --prompt-len 64 --response-len 512]

The update is the whole optimizer step: forward over prompt + response, token log-probs, the
clipped GRPO surrogate (token level, seq-mean-token-mean), backward, global-norm clipping and
AdamW. The PyTorch peer is `transformers.Qwen2ForCausalLM` (sdpa attention, 2 threads) with
the same loss written in torch. Compile time is excluded and listed. With --demo-steps, also a
short CPU demo run and the mean time of each part of its steps (sampling, grading, update).
With --peak-tflops (a GPU's bf16/fp32 peak), the update's MFU from 6 x params x tokens.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

SIZES = {  # the ~5M and ~40M configs of the other benchmarks
    "5m": dict(vocab_size=8000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "40m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
}
B, P, R = 16, 64, 128


def torch_update(hf, opt, tokens, attn, resp_mask, old, adv, eps=0.2):
    import torch
    opt.zero_grad()
    logits = hf(input_ids=tokens, attention_mask=attn).logits[:, P - 1:-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, P:, None])[..., 0]
    m = resp_mask.float()
    ratio = torch.exp(torch.clamp((logp - old) * m, -20, 20))
    a = adv[:, None]
    u = torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
    loss = -((u * m).sum(1) / m.sum(1).clamp(min=1)).sum() / (m.sum(1) > 0).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    opt.step()
    return loss


def bench_size(name, reps, peak_tflops):
    import jax.numpy as jnp
    import tiny_hf
    import torch
    from flax import nnx

    from sspo_jax import model as M
    from sspo_jax.rl import losses, train_batch
    from sspo_jax.train import update as PU

    torch.set_num_threads(2)
    cfg = SIZES[name]
    with tempfile.TemporaryDirectory() as d:
        hf = tiny_hf.make_qwen2(d, seed=0, max_position_embeddings=512, **cfg)
        model = M.from_pretrained(d)
    n_params = sum(p.numel() for p in hf.parameters())
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg["vocab_size"], (B, P + R), generator=gen)
    attn = torch.ones_like(tokens)
    resp_mask = torch.ones(B, R, dtype=torch.long)
    old = -torch.rand(B, R, generator=gen) * 8
    adv = torch.randn(B, generator=gen)

    graphdef, params = nnx.split(model)
    opt = PU.make_optimizer(1e-5)
    opt_state = PU.init_optimizer(opt, params)
    settings = PU.UpdateSettings(loss=losses.preset("grpo"), temperature=1.0, micro_batch_size=B,
                                 logprob_chunk=128)
    batch = train_batch.PolicyBatch(
        tokens=jnp.asarray(tokens.numpy(), jnp.int32), attention_mask=jnp.asarray(attn.numpy(), jnp.int32),
        response_mask=jnp.asarray(resp_mask.numpy(), jnp.int32), old_logp=jnp.asarray(old.numpy()),
        adv=jnp.asarray(adv.numpy()), seg=jnp.arange(B * R, dtype=jnp.int32).reshape(B, R),
        eps_low=jnp.full((B, R), 0.2), eps_high=jnp.full((B, R), 0.2))

    def jax_step():
        nonlocal params, opt_state
        params, opt_state, _, gnorm, _ = PU.update_step(params, opt_state, batch, graphdef=graphdef,
                                                        optimizer=opt, settings=settings)
        gnorm.block_until_ready()

    t0 = time.perf_counter()
    jax_step()
    compile_s = time.perf_counter() - t0
    jax_step()  # and one more untimed call, so nothing left to compile or warm up is timed
    topt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.0)
    hf.train(False)  # no dropout in Qwen2; keeps the peer deterministic
    torch_update(hf, topt, tokens, attn, resp_mask, old, adv)  # warm-up
    jt, tt = [], []
    for _ in range(reps):  # interleaved, so load changes hit both sides
        t0 = time.perf_counter()
        jax_step()
        jt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch_update(hf, topt, tokens, attn, resp_mask, old, adv)
        tt.append(time.perf_counter() - t0)
    j, t = statistics.median(jt), statistics.median(tt)
    tok = B * (P + R)
    row = {"model": f"~{name.upper()} ({n_params / 1e6:.1f}M)", "jax_compile_s": compile_s,
           "jax_step_ms": j * 1e3, "torch_step_ms": t * 1e3, "jax_tok_s": tok / j,
           "torch_tok_s": tok / t, "speedup": t / j}
    if peak_tflops:
        row["jax_mfu"] = 6 * n_params * tok / j / (peak_tflops * 1e12)
    return row


def skewed_lengths(rows: int, prompt_len: int, response_len: int, seed: int = 0,
                   prompt_fill: tuple[float, float] = (0.25, 1.0)):
    """(prompt, response) real lengths like RL on Qwen2.5-Math: prompts uniform in
    [lo * P, hi * P] (`prompt_fill`), responses lognormal with median R/6 (sigma 0.8), clipped to
    [1, R], and 1 row in 16 at the budget R (truncated)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    lo, hi = prompt_fill
    prompts = rng.integers(max(1, round(lo * prompt_len)), round(hi * prompt_len) + 1, rows)
    responses = np.clip(np.round(rng.lognormal(np.log(response_len / 6), 0.8, rows)), 1, response_len)
    responses[rng.choice(rows, max(1, rows // 16), replace=False)] = response_len
    return prompts.astype(int), responses.astype(int)


def skewed_size(name, reps, rows, prompt_len, response_len, micro_rows, prompt_fill=(0.25, 1.0)):
    """The update on a skewed-length rollout batch, padded vs packed (train.packing), same
    weights, batch and loss (SSPO); time per real token."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sspo_jax import model as M
    from sspo_jax.rl import losses, packing, train_batch
    from sspo_jax.train import update as PU

    cfg = M.Qwen2Config(head_dim=SIZES[name]["hidden_size"] // SIZES[name]["num_attention_heads"],
                        max_position_embeddings=prompt_len + response_len, **SIZES[name])
    graphdef, params = nnx.split(M.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    prompts, responses = skewed_lengths(rows, prompt_len, response_len, prompt_fill=prompt_fill)
    rng = np.random.default_rng(1)
    width = prompt_len + response_len
    cols = np.arange(width)[None]
    attn = (cols >= prompt_len - prompts[:, None]) & (cols < prompt_len + responses[:, None])
    tokens = np.where(attn, rng.integers(1, cfg.vocab_size, (rows, width)), 0).astype(np.int32)
    resp_mask = attn[:, prompt_len:].astype(np.int32)
    loss_cfg = losses.preset("sspo")
    seg = jnp.asarray((np.arange(rows * response_len) // 7).reshape(rows, response_len), jnp.int32)
    lo, hi = losses.clip_bounds(loss_cfg, jnp.asarray(resp_mask), seg, jnp.ones((rows, response_len)))
    pb = train_batch.PolicyBatch(
        tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn.astype(np.int32)),
        response_mask=jnp.asarray(resp_mask),
        old_logp=jnp.asarray(-rng.random((rows, response_len)) * 3, jnp.float32),
        adv=jnp.asarray(rng.standard_normal(rows), jnp.float32), seg=seg, eps_low=lo, eps_high=hi)
    # Packed with the LM head on every slot (head_group_rows=0) and on the loss tokens only.
    every = packing.plan_batch(pb, rows_multiple=micro_rows, head_group_rows=0)
    layout = packing.plan_batch(pb, rows_multiple=micro_rows)
    opt = PU.make_optimizer(1e-5)
    padded_settings = PU.UpdateSettings(loss=loss_cfg, temperature=1.0, micro_batch_size=micro_rows,
                                        logprob_chunk=128)
    packed_settings = PU.UpdateSettings(loss=loss_cfg, temperature=1.0, micro_batch_size=micro_rows,
                                        logprob_chunk=128, response_len=response_len)
    states = {k: [jax.tree.map(jnp.copy, params), None] for k in ("padded", "every", "packed")}
    for k in states:
        states[k][1] = PU.init_optimizer(opt, states[k][0])

    def step(kind, batch, settings):
        def run():
            st = states[kind]
            st[0], st[1], _, gnorm, _ = PU.update_step(st[0], st[1], batch, graphdef=graphdef,
                                                       optimizer=opt, settings=settings)
            gnorm.block_until_ready()
        return run

    runs = {"padded": step("padded", pb, padded_settings),
            "every": step("every", packing.pack(pb, every), packed_settings),
            "packed": step("packed", packing.pack(pb, layout), packed_settings)}
    compile_s = {}
    for k, run in runs.items():
        t0 = time.perf_counter()
        run()
        compile_s[k] = time.perf_counter() - t0
        run()
    times = {k: [] for k in runs}
    for _ in range(reps):  # interleaved, so load changes hit both sides
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    real = int(attn.sum())
    return {"model": f"~{name.upper()}", "rows x slots": f"{rows} x {width}",
            "real tokens": real, "packed rows": layout.source.shape[0],
            "prompts (real / P)": f"{prompts.mean() / prompt_len:.2f}",
            "real / padded slots": f"{real / (rows * width):.2f}",
            "slot ratio": rows * width / layout.source.size,
            # LM head token rows: padded R per row; packed, head on every slot; on loss tokens
            "head rows (padded, every, loss)": f"{rows * response_len}, {layout.source.size}, "
                                               f"{layout.source.shape[0] // layout.group_rows * layout.head_slots}",
            "padded ms": med["padded"] * 1e3, "packed ms, head on every slot": med["every"] * 1e3,
            "packed ms": med["packed"] * 1e3,
            "padded us/real tok": med["padded"] / real * 1e6, "packed us/real tok": med["packed"] / real * 1e6,
            "speed-up (head on every slot)": med["padded"] / med["every"],
            "speed-up": med["padded"] / med["packed"],
            "compile s (padded, every, packed)": ", ".join(f"{compile_s[k]:.1f}" for k in runs)}


def demo_breakdown(steps):
    import json

    from sspo_jax import run_config
    from sspo_jax.train import loop
    c = run_config.get_config()
    c.steps = steps
    c.eval.every = 0
    with tempfile.TemporaryDirectory() as d:
        loop.train_and_evaluate(c, d)
        rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))][2:]  # skip step 0 and the compiling step 1
    keys = ["time/sampling_s", "time/grading_s", "time/update_s", "time/step_s"]
    return {k: statistics.mean(r[k] for r in rows) for k in keys}, len(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="5m,40m")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--demo-steps", type=int, default=6)
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--workload", default="uniform", choices=["uniform", "skewed"],
                    help="uniform: JAX vs PyTorch on full rows; skewed: padded vs packed update on "
                         "RL-like lengths (skewed_lengths)")
    ap.add_argument("--rows", type=int, default=64, help="skewed: rollout rows")
    ap.add_argument("--prompt-len", type=int, default=64, help="skewed: prompt bucket P")
    ap.add_argument("--response-len", type=int, default=512, help="skewed: max_new_tokens R")
    ap.add_argument("--micro-rows", type=int, default=8, help="skewed: rows per micro-batch (both)")
    ap.add_argument("--prompt-fill", default="0.25,1.0",
                    help="skewed: real prompt lengths uniform in [lo*P, hi*P]. The Qwen configs' "
                         "prompt bucket is 1024 for MATH prompts of ~50-350 tokens: 0.05,0.35")
    args = ap.parse_args()
    if args.workload == "skewed":
        try:
            fill = tuple(float(x) for x in args.prompt_fill.split(","))
        except ValueError:
            fill = ()
        if len(fill) != 2 or not 0 < fill[0] <= fill[1] <= 1 or round(fill[1] * args.prompt_len) < 1:
            ap.error(f"--prompt-fill={args.prompt_fill}: need lo,hi with 0 < lo <= hi <= 1")
        rows = [skewed_size(s, args.reps, args.rows, args.prompt_len, args.response_len, args.micro_rows, fill)
                for s in args.sizes.split(",")]
    else:
        rows = [bench_size(s, args.reps, args.peak_tflops) for s in args.sizes.split(",")]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if args.workload == "skewed":
        args.demo_steps = 0
    if args.demo_steps > 2:
        means, n = demo_breakdown(args.demo_steps)
        print(f"\nCPU demo step breakdown (mean of {n} steps after the first):")
        for k, v in means.items():
            print(f"| {k} | {v:.3f} |")
    os.system("uptime")


if __name__ == "__main__":
    main()
