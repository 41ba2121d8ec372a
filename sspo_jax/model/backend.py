"""The one platform decision of a model: which forms it traces and which attention kernel it runs.

Taken once, when the model is built (from the platform of the mesh's devices, or of the first
device), and held in the model as a frozen value (static under jit). Nothing else in the model
reads `jax.default_backend()`.

  platform   cpu | gpu | tpu: on cpu the model traces the forms tuned for XLA's CPU backend
             (model/cpu_forms.py); other platforms the general forms (model/layers.py).
  attention  xla (the reference: scores materialised, any platform) | splash (Pallas TPU splash
             attention; on cpu through Pallas's interpreter, for tests) | cudnn (cuDNN flash
             attention through `jax.nn.dot_product_attention`, GPU, bfloat16/float16).
             `auto`: splash on TPU, cudnn on GPU (xla for a float32 model: cuDNN has no float32
             kernel), xla on CPU.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "xla", "splash", "cudnn")
PLATFORMS = ("cpu", "gpu", "tpu")
_RUNS_ON = {"xla": PLATFORMS, "splash": ("tpu", "cpu"), "cudnn": ("gpu",)}
_HALF = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 256  # cuDNN flash attention on Hopper (compute capability 9.0) and later
CUDNN_MAX_HEAD_DIM_BEFORE_HOPPER = 128


@dataclasses.dataclass(frozen=True)
class Backend:
    platform: str = "cpu"
    attention: str = "xla"

    @property
    def cpu_forms(self) -> bool:
        """Trace the forms of model/cpu_forms.py (2-D projections, rope without concatenate,
        query-blocked causal attention, unrolled layer scan, per-layer decode weights)."""
        return self.platform == "cpu"

    @property
    def interpret(self) -> bool:
        """Run Pallas TPU kernels through the interpreter (off a TPU: tests on CPU)."""
        return self.platform != "tpu"


def platform_of(devices: Any = None) -> str:
    """cpu | gpu | tpu of `devices` (a mesh, a list of devices; default the first JAX device)."""
    if devices is None:
        devices = jax.devices()
    elif hasattr(devices, "devices"):  # a Mesh
        devices = devices.devices.flat
    name = next(iter(devices)).platform.lower()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def resolve(attention: str = "auto", platform: str | None = None, dtype: Any = jnp.float32,
            head_dim: int = 128) -> Backend:
    """The Backend for an `attention` choice on `platform` (None: the first JAX device's) for a
    model computing in `dtype` with `head_dim`. Raises ValueError naming the problem before
    anything compiles."""
    platform = platform or platform_of()
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r}: the model runs on {PLATFORMS}")
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention={attention!r}: choose one of {ATTENTION_CHOICES}")
    half = np.dtype(dtype) in _HALF
    max_head = _cudnn_max_head_dim() if platform == "gpu" else CUDNN_MAX_HEAD_DIM
    cudnn_head = head_dim % 8 == 0 and head_dim <= max_head
    if attention == "auto":
        attention = {"tpu": "splash", "gpu": "cudnn" if half and cudnn_head else "xla", "cpu": "xla"}[platform]
    if platform not in _RUNS_ON[attention]:
        raise ValueError(f"attention={attention!r} does not run on {platform}: it runs on "
                         f"{list(_RUNS_ON[attention])}; use attention='auto' or 'xla'")
    if attention == "cudnn" and not half:
        raise ValueError(f"attention='cudnn' needs a bfloat16 or float16 compute dtype (cuDNN flash "
                         f"attention has no {np.dtype(dtype).name} kernel): set model.dtype=bfloat16, "
                         "or use attention='xla'")
    if attention == "cudnn" and not cudnn_head:
        raise ValueError(f"attention='cudnn' needs a head_dim that is a multiple of 8 and at most "
                         f"{max_head}, this model's is {head_dim}: use attention='xla'")
    if attention == "splash" and platform == "cpu":
        log.warning("attention='splash' on cpu runs through the Pallas interpreter: exact, and "
                    "slow (meant for tests)")
    return Backend(platform=platform, attention=attention)


def _cudnn_max_head_dim() -> int:
    """cuDNN's largest flash-attention head_dim on this machine's first GPU (Hopper and later:
    256; before: 128); 256 when no GPU is visible (a model built for GPU elsewhere)."""
    try:
        device = jax.devices()[0]
        capability = float(getattr(device, "compute_capability", "9.0"))
    except (RuntimeError, ValueError):
        return CUDNN_MAX_HEAD_DIM
    return CUDNN_MAX_HEAD_DIM if capability >= 9.0 else CUDNN_MAX_HEAD_DIM_BEFORE_HOPPER
