"""Timing of tunix's vanilla (static-batch) sampler on a Hugging Face Qwen2 checkpoint.

What it measures: the wall time of one whole `tunix.generate.sampler.Sampler` call (prefill +
decode loop + tunix's own host-side output slicing) generating `--max-new-tokens` tokens greedily
for `--rows` prompts of the given lengths. tunix's sampler is static: every row runs until the
longest is done, so the call costs rows x max_new_tokens decode work however early a row would
finish. Here no row can finish early: the EOS id defaults to `vocab_size`, an id argmax over the
vocabulary can never return (and the prompts never contain), so the loop runs all N steps for all
R rows. The first call (trace + compile + run) is reported as `compile_s`; then `--reps` timed
calls, the minimum kept as `best_s`; throughput is rows * max_new_tokens / best_s.

The checkpoint (config.json + model.safetensors as written by transformers' `save_pretrained`,
tied or untied embeddings) is loaded with tunix's own safetensors loader for Qwen2
(`tunix.models.qwen2.params.create_model_from_safe_tensors`) into float32 parameters on the
default JAX device. Prompts are random token ids in [1, vocab) drawn with numpy from `--seed`;
tunix's sampler takes strings and a tokenizer, so a tiny id tokenizer maps "17 4 99" <-> [17, 4,
99] and the prompts tunix left-pads (pad id 0, which the prompts never contain) are exactly those
ids; the script checks that against the sampler's `padded_prompt_tokens`.

This script runs in tunix's own virtualenv (google-tunix 0.1.7 and its JAX), not in sspo_jax's,
and imports nothing from sspo_jax. benchmarks/sampling.py's skewed workload calls it as the tunix
peer and reads the JSON dict it prints as its last stdout line (or writes to `--json`):

    {"tunix_version", "rows", "max_new_tokens", "compile_s", "best_s", "new_tokens",
     "tokens_per_s", ...}

Run it by hand, e.g. on CPU:

    JAX_PLATFORMS=cpu /work/tunix-venv/bin/python benchmarks/tunix_sampler.py \\
        --hf-dir /tmp/tunix_ck --rows 8 --prompt-lens 16 --max-new-tokens 32 --json /tmp/tunix.json

Caveats of tunix 0.1.7's vanilla sampler, seen in its source: its decode loop stops early only
when every row has produced an EOS; to produce N tokens it runs one prefill plus N decode steps
(the last step's token falls off the end of its buffer); a generated token equal to the pad id is
masked out of attention on later steps like padding; the EOS ids are baked into the jitted loop
at a Sampler's first call (later calls with other `eos_tokens` keep the first ones in the loop and
use the new ones only to cut the output), so this script builds one Sampler per EOS; and Qwen2 has
no `init_cache`, so the KV cache is sized by the `CacheConfig` given here (cache_size >= max
prompt length + N).
"""
import argparse
import importlib.metadata
import json
import sys
import time
import warnings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF Qwen2 checkpoint dir (config.json + *.safetensors)")
    p.add_argument("--rows", type=int, required=True, help="batch size R")
    p.add_argument("--prompt-lens", required=True,
                   help="comma list of R prompt lengths in tokens, or one number for all rows")
    p.add_argument("--max-new-tokens", type=int, required=True, help="N: generation steps")
    p.add_argument("--reps", type=int, default=2, help="timed calls after the warm-up; min kept")
    p.add_argument("--seed", type=int, default=0, help="numpy seed for the prompt ids")
    p.add_argument("--threads", type=int, default=None,
                   help="accepted for CLI parity with the caller; ignored (XLA picks its own threads)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="EOS id; default vocab_size, which greedy decoding can never emit")
    p.add_argument("--cache-size", type=int, default=None,
                   help="KV cache length; default max prompt length + max_new_tokens")
    p.add_argument("--json", default=None, help="also write the result dict here")
    args = p.parse_args(argv)
    lens = [int(x) for x in args.prompt_lens.split(",") if x.strip()]
    if len(lens) == 1:
        lens = lens * args.rows
    if len(lens) != args.rows:
        p.error(f"--prompt-lens has {len(lens)} entries, --rows is {args.rows}")
    if args.rows < 1 or args.max_new_tokens < 1 or args.reps < 1 or min(lens) < 1:
        p.error("--rows, --max-new-tokens, --reps and every prompt length must be >= 1")
    args.prompt_lens = lens
    return args


def model_config(hf: dict, model_lib, jnp):
    """tunix Qwen2 ModelConfig from a transformers Qwen2 config.json dict (float32)."""
    if hf.get("model_type", "qwen2") != "qwen2":
        raise ValueError(f"expected a qwen2 checkpoint, got model_type={hf.get('model_type')!r}")
    if hf.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not modelled by tunix's Qwen2")
    # transformers >= 5 nests rope_theta under rope_parameters; older versions keep it top level.
    rope = hf.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError("only default RoPE is supported here")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    return model_lib.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hidden,
        hidden_dim=hf["intermediate_size"],
        num_heads=heads,
        head_dim=hidden // heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        rope_theta=rope_theta,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        use_tied_embedding=bool(hf.get("tie_word_embeddings", False)),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )


class IdTokenizer:
    """Space-separated decimal ids <-> token ids, with the five methods tunix's TokenizerAdapter needs.

    bos_id() is None so tunix's Sampler.tokenize prepends nothing: the prompt is exactly the ids.
    """

    def __init__(self, pad_id: int, eos_id: int):
        self._pad, self._eos = pad_id, eos_id

    def encode(self, text, **kwargs):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs):
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self):
        return None

    def eos_id(self):
        return self._eos

    def pad_id(self):
        return self._pad


def main(argv=None):
    args = parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen2 import model as model_lib
    from tunix.models.qwen2 import params as params_lib

    # Known, harmless noise from tunix 0.1.7: its fallback KV-cache init (Qwen2 has no init_cache)
    # and, on CPU, XLA declining the donated sampling state.
    warnings.filterwarnings("ignore", message=".*deprecated _init_cache.*")
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")

    with open(f"{args.hf_dir}/config.json") as f:
        hf_cfg = json.load(f)
    cfg = model_config(hf_cfg, model_lib, jnp)
    vocab = cfg.vocab_size
    pad_id = 0
    eos_id = vocab if args.eos_id is None else args.eos_id
    if eos_id == pad_id:
        raise SystemExit("--eos-id must differ from the pad id 0")

    t0 = time.perf_counter()
    model = params_lib.create_model_from_safe_tensors(args.hf_dir, cfg, mesh=None, dtype=jnp.float32)
    load_s = time.perf_counter() - t0

    rows, n_new = args.rows, args.max_new_tokens
    max_prompt = max(args.prompt_lens)
    cache_size = args.cache_size or (max_prompt + n_new)
    if cache_size < max_prompt + n_new:
        raise SystemExit(f"--cache-size {cache_size} < max prompt {max_prompt} + {n_new} new tokens")

    # Random prompt ids in [1, vocab), never the pad (0) nor the EOS id.
    rng = np.random.default_rng(args.seed)
    prompts = []
    for length in args.prompt_lens:
        ids = rng.integers(1, vocab, size=length)
        while (ids == eos_id).any():
            ids = np.where(ids == eos_id, rng.integers(1, vocab, size=length), ids)
        prompts.append(ids.astype(np.int32))
    prompt_strings = [" ".join(map(str, ids.tolist())) for ids in prompts]
    expected_padded = np.full((rows, max_prompt), pad_id, np.int32)
    for i, ids in enumerate(prompts):
        expected_padded[i, max_prompt - len(ids):] = ids

    sampler = sampler_lib.Sampler(
        transformer=model,
        tokenizer=IdTokenizer(pad_id=pad_id, eos_id=eos_id),
        cache_config=sampler_lib.CacheConfig(
            cache_size=cache_size,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
        ),
    )

    def call():
        t = time.perf_counter()
        out = sampler(
            prompt_strings,
            max_generation_steps=n_new,
            max_prompt_length=max_prompt,  # exact: no rounding up to a power of two
            echo=False,
            eos_tokens=[eos_id],
            temperature=0.0,  # greedy: no top_p, no beam_size
            seed=args.seed,
        )
        jax.block_until_ready(out.tokens)  # already host numpy after tunix's device_get
        return out, time.perf_counter() - t

    dev = jax.devices()[0]
    print(f"tunix {importlib.metadata.version('google-tunix')}  jax {jax.__version__}  "
          f"device {dev.platform}:{getattr(dev, 'device_kind', '')}  load {load_s:.2f}s  "
          f"rows {rows}  prompt {min(args.prompt_lens)}..{max_prompt}  new {n_new}  cache {cache_size}",
          flush=True)

    out, compile_s = call()
    if not np.array_equal(np.asarray(out.padded_prompt_tokens), expected_padded):
        raise SystemExit("tunix's padded prompt tokens differ from the chosen ids")
    gen_lens = np.array([len(t) for t in out.tokens])  # tokens before the first EOS, EOS excluded
    hit_eos = gen_lens < n_new
    steps_ran = int(np.max(np.where(hit_eos, gen_lens + 1, gen_lens)))
    print(f"warm-up (compile+run): {compile_s:.3f}s  steps ran {steps_ran}/{n_new}  "
          f"rows that emitted EOS {int(hit_eos.sum())}/{rows}", flush=True)
    if steps_ran < n_new:
        print(f"warning: all rows emitted EOS {eos_id}; tunix stopped after {steps_ran} of {n_new} "
              "steps, so tokens_per_s overstates", file=sys.stderr)

    best_s = float("inf")
    for rep in range(args.reps):
        _, dt = call()
        best_s = min(best_s, dt)
        print(f"rep {rep + 1}/{args.reps}: {dt:.3f}s  ({rows * n_new / dt:.1f} new tok/s)", flush=True)

    result = {
        "tunix_version": importlib.metadata.version("google-tunix"),
        "rows": rows,
        "max_new_tokens": n_new,
        "compile_s": round(compile_s, 4),
        "best_s": round(best_s, 4),
        "new_tokens": rows * n_new,
        "tokens_per_s": round(rows * n_new / best_s, 2),
        "steps_ran": steps_ran,
        "prompt_lens": args.prompt_lens,
        "cache_size": cache_size,
        "eos_id": eos_id,
        "reps": args.reps,
        "load_s": round(load_s, 3),
        "jax_version": jax.__version__,
        "platform": dev.platform,
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
