"""Data: problem sources, prompt templates, grain prompt pipelines, benchmarks, synthetic task.

Nothing here imports the model; JAX is imported only to default the host shard in
``PromptPipeline``. The tokenizer module (``sspo_jax.data.tokenizer``) is imported on demand.
"""
from sspo_jax.data.benchmarks import BENCHMARKS, FIVE_BENCHMARKS, Benchmark, load_benchmark
from sspo_jax.data.pipeline import PromptIterator, PromptPipeline
from sspo_jax.data.sources import FieldMap, last_boxed, load_rows, map_row
from sspo_jax.data.templates import QWEN_MATH_SYSTEM_PROMPT, TEMPLATE_NAMES, render_prompt

__all__ = [
    "BENCHMARKS", "FIVE_BENCHMARKS", "Benchmark", "load_benchmark", "PromptIterator",
    "PromptPipeline", "FieldMap", "last_boxed", "load_rows", "map_row",
    "QWEN_MATH_SYSTEM_PROMPT", "TEMPLATE_NAMES", "render_prompt",
]
