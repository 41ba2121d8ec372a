"""Qwen2.5-Math-7B: the 1.5B settings on the 7B model (`--config=configs/qwen2_5_math_7b.py:sspo`).

Only the model changes; the micro-batch (8 rows: one per device on an 8-device slice, which
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
    return c
