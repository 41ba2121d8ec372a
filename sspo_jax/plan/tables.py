"""What the memory plan (sspo_jax.plan) reads and prints: the TPU chips, the built-in model
shapes, the assumed utilisation and fit limit; the advice for what does not fit, and the
Markdown report. The formulas are in sspo_jax.plan."""
from __future__ import annotations

import dataclasses
import os
import re

from sspo_jax import parallel
from sspo_jax.model.config import Qwen2Config

GIB = 2 ** 30
FIT_FRACTION = 0.9  # the rest of HBM is left to XLA's own temporaries and fragmentation
# Assumed model-FLOPs utilisation for prefill and training, and the fraction of the HBM roofline
# a decode step reaches. Assumptions, not measurements; docs/scaling.md says why these ranges.
TRAIN_MFU = (0.25, 0.45)
DECODE_EFFICIENCY = (0.3, 0.6)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip (one JAX device: v4 and v5p run their two TensorCores as one megacore)."""
    family: str
    hbm_bytes: float
    peak_flops: float          # dense bf16 FLOP/s
    hbm_bandwidth: float       # bytes/s
    ici_bandwidth: float       # bytes/s per chip, both directions of all its ICI ports added
    ici_ports: int             # ICI links per chip: 4 on the 2-D tori (v5e, v6e), 6 on the 3-D
    cores_per_chip: int        # the accelerator type counts TensorCores on v4/v5p (v4-8 = 4 chips)
    chips_per_host: int
    source: str

    @property
    def ici_link_bandwidth(self) -> float:
        """One ICI link, one direction (bytes/s)."""
        return self.ici_bandwidth / (2 * self.ici_ports)

    @property
    def ici_gather_bandwidth(self) -> float:
        """What a chip receives per second in an all-gather over a mesh axis laid along one torus
        dimension with wraparound (a bidirectional ring): its two links on that dimension, one
        direction each. Without wraparound (a line) an all-gather takes up to twice as long; an
        axis spread over several dimensions gets more links. The plan assumes the ring."""
        return 2 * self.ici_link_bandwidth


# Figures from Google's Cloud TPU system-architecture pages (the URL in each entry), checked
# against them: peak bf16 FLOP/s, HBM capacity and bandwidth, "bidirectional ICI bandwidth per
# chip" (v5e 400 GB/s, v5p 1200 GB/s, v6e 800 GB/s; older versions of the pages gave the same
# figures as one direction in Gbit/s: 1600, 4800, 3200) and ports (4 on v5e / v6e; v4 and v5p
# are 3-D tori, 6). The v4 page gives no per-chip ICI figure, only the pod's bisection bandwidth
# (24 TB/s over the 2 x 16 x 16 = 512 links crossing a 16^3 pod): 46.9 GB/s per link and
# direction, so 2 x 6 x 46.9 = 562.5 GB/s per chip. The same derivation gives v5e's published
# figure from its 1.6 TB/s pod bisection (32 links: 50 GB/s, 2 x 4 x 50 = 400 GB/s). The pages
# write "16 GB" / "32 GB" for v5e / v6e HBM; taken as GiB here (the 90% fit margin covers the
# difference).
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1200e9, 2 * 6 * 24e12 / 512, 6, 2, 4,
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 400e9, 4, 1, 8,
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 1200e9, 6, 2, 4,
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1638e9, 800e9, 4, 1, 8,
                "https://cloud.google.com/tpu/docs/v6e"),
}
FAMILY_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    chip: Chip
    chips: int
    hosts: int


def parse_slice(name: str) -> Slice:
    """`v4-8`, `v5e-8` (= `v5litepod-8`), `v5p-64`, `v6e-8`, ...: the number is what the
    accelerator type says (TensorCores on v4/v5p, chips on v5e/v6e)."""
    match = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", name.strip())
    if not match:
        raise ValueError(f"unknown TPU slice {name!r}: use an accelerator type such as v4-8, "
                         f"v5e-8 (v5litepod-8), v5p-8, v5p-64 or v6e-8 (families: "
                         f"{', '.join(CHIPS)})")
    chip = CHIPS[FAMILY_ALIASES.get(match[1], match[1])]
    count = int(match[2])
    if count < chip.cores_per_chip or count % chip.cores_per_chip:
        raise ValueError(f"TPU slice {name!r}: a {chip.family} slice counts {chip.cores_per_chip} "
                         f"TensorCores per chip, so its number must be a multiple of that")
    chips = count // chip.cores_per_chip
    return Slice(name, chip, chips, max(1, chips // chip.chips_per_host))


# config.json values of the hub checkpoints Qwen/Qwen2.5-Math-1.5B and Qwen/Qwen2.5-Math-7B, so
# that a plan needs no download (read from copies of those files on the hub:
# unsloth/Qwen2.5-Math-1.5B, and a fine-tune whose _name_or_path is Qwen/Qwen2.5-Math-7B).
# With train.packing the plan counts real tokens: the prompt bucket plus a mean response of this
# fraction of max_new_tokens (an assumption: RL on Qwen2.5-Math gives a median of a few hundred
# of 3000 tokens and a tail at the budget; measure yours: `response/length_mean` in metrics.jsonl).
PACKED_RESPONSE_FRACTION = 0.25

KNOWN_MODELS = {
    "Qwen/Qwen2.5-Math-1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                   num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, head_dim=128, tie_word_embeddings=True,
                                   max_position_embeddings=4096),
    "Qwen/Qwen2.5-Math-7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
                                 max_position_embeddings=4096),
}


def model_config(config) -> tuple[str, Qwen2Config]:
    """(name, architecture) of `config.model`: a local HF directory's config.json, a known hub
    id, or (hf_dir "") the demo's tiny model built as train.setup.build_policy builds it."""
    m = config.model
    if m.hf_dir and os.path.isfile(os.path.join(m.hf_dir, "config.json")):
        return m.hf_dir, Qwen2Config.from_hf(m.hf_dir)
    if m.hf_dir in KNOWN_MODELS:
        return m.hf_dir, Qwen2Config(**KNOWN_MODELS[m.hf_dir])
    if m.hf_dir:
        raise ValueError(f"model.hf_dir={m.hf_dir!r} is neither a local directory with config.json "
                         f"nor a known hub id ({', '.join(KNOWN_MODELS)}): download it first")
    from sspo_jax.data.tokenizer import build_tokenizer, load_tokenizer
    tokenizer = load_tokenizer(m.tokenizer_dir) if m.tokenizer_dir else build_tokenizer()
    tiny = dict(m.tiny)
    return "tiny demo model", Qwen2Config(
        vocab_size=len(tokenizer), head_dim=tiny["hidden_size"] // tiny["num_attention_heads"], **tiny)


# ---------------------------------------------------------------- advice and the report

SHARD_MORE = ("shard it over more devices: mesh.fsdp=-1 (the whole slice), a larger slice, or "
              "more slices along fsdp (mesh.dcn_fsdp)")
FEWER_ROWS = ("sample in several passes of fewer prompts (a smaller {what}), shorten "
              "max_new_tokens, or put more devices on the batch axes (mesh.data x mesh.fsdp)")
FEWER_SLOTS = ("decode in fewer slots (a smaller rollout.slots: the rows queue for them), shorten "
               "max_new_tokens, or put more devices on the batch axes (mesh.data x mesh.fsdp)")


def problems(s, mesh, items, totals: dict[str, float], hbm: float) -> list[str]:
    """What does not fit or does not split, each with the change that helps most (s: the step's
    plan.Shapes, items: plan.Item list, totals: bytes per phase)."""
    out = []
    shards = mesh.batch_shards
    for what, rows in (("rollout batch", s.rows), ("train.micro_batch_size", s.micro_rows)):
        if rows % shards:
            out.append(f"the {what} ({rows} rows) does not split over the {shards} batch shards "
                       f"(data x fsdp): the trainer refuses it; use a multiple of {shards}")
    limit = FIT_FRACTION * hbm
    state = [i for i in items if i.phase == "state"]
    if sum(i.bytes for i in state) > limit:
        out.append(f"the state alone (parameters, Adam moments) takes "
                   f"{gib(sum(i.bytes for i in state))} per device: {_fix(state[0], mesh)}")
    for phase, total in totals.items():
        if total > limit:
            biggest = max((i for i in items if i.phase == phase), key=lambda i: i.bytes)
            out.append(f"{phase} needs {gib(total)} per device; its largest item is {biggest.name} "
                       f"({gib(biggest.bytes)}): {_fix(biggest, mesh)}")
    return out


def _fix(item, mesh) -> str:
    if item.fix == SHARD_MORE and mesh.ici[1] * mesh.ici[2] == mesh.devices // mesh.slices:
        return ("fsdp x tensor already span the slice: a larger slice, more slices along fsdp "
                "(mesh.dcn_fsdp), or model.param_dtype=bfloat16 (halves parameters, gradients "
                "and Adam moments, but lr 1e-6 updates may vanish in bfloat16)")
    return item.fix


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _flops(n: float) -> str:
    return f"{n:.3g}"


def _seconds(lo_hi: tuple[float, float]) -> str:
    return f"{lo_hi[0]:.3g}-{lo_hi[1]:.3g} s"


def report(p, show_items: bool = True) -> str:
    """The markdown report of `p`, a sspo_jax.plan.Plan: setup, memory per item (show_items) and
    per phase, fit verdict, cost model."""
    config, slice_, cfg, mesh, s = p.config, p.slice, p.cfg, p.mesh, p.shapes
    items, totals, issues, costs, times = p.items, p.totals, p.issues, p.costs, p.times
    chip = slice_.chip
    hbm = chip.hbm_bytes
    d, f, t = (mesh.sizes[a] for a in parallel.MESH_AXES)
    lines = [
        f"# Plan: {p.config_name} on {slice_.name}" + (f" x {mesh.slices} slices" if mesh.slices > 1 else ""),
        "",
        f"- model: {p.model_name}: {p.params / 1e9:.3g}e9 parameters (hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv, "
        f"vocab {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} head); "
        f"parameters {config.model.param_dtype}, compute {config.model.dtype}, remat {config.model.remat}, "
        f"attention {p.attention}",
        f"- slice: {slice_.name}: {slice_.chips} chips ({slice_.hosts} host(s)) x {gib(hbm)} HBM, "
        f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s per chip; "
        f"ICI {chip.ici_bandwidth / 1e9:.0f} GB/s per chip both ways over {chip.ici_ports} links "
        f"({chip.ici_link_bandwidth / 1e9:.3g} GB/s per link and direction) ({chip.source})",
        f"- mesh: data={d} fsdp={f} tensor={t} over {mesh.devices} devices (within a slice "
        f"{mesh.ici}, slices {mesh.dcn}); the batch splits {mesh.batch_shards} ways",
        f"- step: {s.prompts} prompts x {s.samples} samples = {s.rows} rows of {s.prompt_len} prompt + "
        f"{s.new_tokens} new tokens, sampled in "
        + (f"a continuous pool of {s.decode_rows(mesh.batch_shards)} slots (rows queue; an assumed mean "
           f"response of {PACKED_RESPONSE_FRACTION:.0%} of max_new_tokens)" if s.engine == "continuous"
           else f"{s.passes} passes of {s.per_pass} prompts" if s.passes > 1 else "one pass")
        + f"; micro-batch {s.micro_rows} rows; "
        f"{config.train.ppo_mini_batches} mini-batches x {config.train.ppo_epochs} epoch(s)",
        "",
        "## Memory per device",
    ]
    if show_items:
        lines += ["", "| phase | item | per device | how |", "| --- | --- | ---: | --- |"]
        lines += [f"| {i.phase} | {i.name} | {gib(i.bytes)} | {i.formula} |" for i in items]
    state = sum(i.bytes for i in items if i.phase == "state")
    lines += ["", f"| phase | total with the state ({gib(state)}) | of HBM |", "| --- | ---: | ---: |"]
    lines += [f"| {phase} | {gib(v)} | {v / hbm:.0%} |" for phase, v in totals.items()]
    peak_phase = max(totals, key=totals.get)
    verdict = ("DOES NOT FIT" if not p.fits else "FITS, BUT THE BATCH DOES NOT SPLIT"
               if issues else "FITS")
    lines += ["", f"**{verdict}**: peak {gib(totals[peak_phase])} per device ({peak_phase}) of "
              f"{gib(hbm)} HBM (limit {FIT_FRACTION:.0%})."]
    lines += [f"- {i}" for i in issues]

    lines += [
        "", "## Cost per RL step", "",
        f"Tokens (padded, as computed): prompts {costs.prompt_tokens:,}, sampled {costs.sampled_tokens:,} "
        f"(every row runs until the longest stops; worst case max_new_tokens), trained "
        f"{costs.trained_tokens:,} ("
        + ("train.packing: real tokens, rows x (prompt + an assumed mean response of "
           f"{PACKED_RESPONSE_FRACTION:.0%} of max_new_tokens) x epochs)." if config.train.packing
           else "rows x (prompt + response) x epochs)."),
        "",
        "| part | FLOPs | time on this slice | basis |",
        "| --- | ---: | ---: | --- |",
        f"| sampling: prefill | {_flops(costs.prefill_flops)} | {_seconds(times.prefill)} | MFU {TRAIN_MFU[0]:.0%}-{TRAIN_MFU[1]:.0%} |",
        (f"| sampling: decode, continuous, {costs.decode_steps} steps of {s.decode_rows(mesh.batch_shards)} slots | "
         if s.engine == "continuous" else
         f"| sampling: decode, {(f'{s.passes} x ' if s.passes > 1 else '')}{s.new_tokens} steps | ") +
        f"{_flops(costs.decode_flops)} | {_seconds(times.decode)} | "
        f"roofline {times.decode_roofline:.3g} s at {DECODE_EFFICIENCY[0]:.0%}-{DECODE_EFFICIENCY[1]:.0%}: "
        f"{costs.decode_step_bytes / 1e9:.3g} GB HBM"
        + (f" + {costs.decode_step_ici_bytes / 1e9:.3g} GB ICI (all-gathers at "
           f"{chip.ici_gather_bandwidth / 1e9:.3g} GB/s)" if costs.decode_step_ici_bytes else "")
        + " per device per step |",
        f"| training (model FLOPs) | {_flops(costs.train_model_flops)} | {_seconds(times.train)} | "
        f"MFU {TRAIN_MFU[0]:.0%}-{TRAIN_MFU[1]:.0%}; executed with remat: {_flops(costs.train_flops)}"
        + (" (the fused kernel skips the blocks above the causal diagonal)" if p.attention != "xla" else "") + " |",
    ]
    if costs.recompute_flops:
        lines.append(f"| old / reference log-probs | {_flops(costs.recompute_flops)} | "
                     f"{_seconds(times.recompute)} | forward only |")
    lines += [f"| **total** (grading and evaluation not included) | | **{_seconds(times.total)}** | |"]
    return "\n".join(lines) + "\n"
