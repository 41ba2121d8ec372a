"""Qwen2.5-Math-7B: the 1.5B settings on the 7B model (`--config=configs/qwen2_5_math_7b.py:sspo`).

The model changes, and the sampler decodes from the fsdp-sharded weights (mesh.sampler_reshard
off): the smallest slices that fit 7B (v4-32, v5e-32 with tensor=2) have no room for the
gathered copy; turn it on where it fits (v5p-8 with passes of 64, v5p-64: the plan shows the
decode 2-9x faster). The micro-batch (8 rows: one per device on an 8-device slice, which
the mesh requires as a minimum there) is the 1.5B one. Memory plans: docs/scaling.md.
"""
import importlib.util
import os

# Config files are loaded by path (ml_collections), so the sibling is loaded by path too.
_spec = importlib.util.spec_from_file_location(
    "qwen2_5_math_1_5b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_math_1_5b.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg: str | None = None):
    c = _base.get_config(arg)
    c.model.hf_dir = "Qwen/Qwen2.5-Math-7B"
    c.mesh.sampler_reshard = False
    return c
