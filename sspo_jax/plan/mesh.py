"""The plan's view of a model on a mesh (sspo_jax.plan): parameter counts in closed form, the
arrays the model creates, how many ways the trainer's sharding rules split each one, and the
run's mesh on a TPU slice. Nothing is allocated; only shapes and axis sizes."""
from __future__ import annotations

import dataclasses
import math
import types

from sspo_jax import parallel
from sspo_jax.model.config import Qwen2Config
from sspo_jax.model.qwen2 import layer_param_specs
from sspo_jax.plan.tables import Slice

# ---------------------------------------------------------------- parameters and sharding

def param_count(cfg: Qwen2Config) -> int:
    """Parameters of Qwen2ForCausalLM, closed form: embedding, (LM head unless tied), final norm,
    and per layer two norms, q/k/v projections with biases, o projection and the SwiGLU MLP."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = 2 * h + (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * i
    heads = 1 if cfg.tie_word_embeddings else 2
    return heads * cfg.vocab_size * h + h + cfg.num_hidden_layers * per_layer


def matmul_params(cfg: Qwen2Config) -> tuple[int, int]:
    """(decoder-layer weights, LM-head weights) used in matmuls: 2 FLOPs each per token."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * (2 * h * q + 2 * h * kv + 3 * h * i), cfg.vocab_size * h


def param_arrays(cfg: Qwen2Config) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    """(shape, logical axes) of every parameter array, as the model creates them."""
    arrays = [((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed")),
              ((cfg.hidden_size,), ("norm",))]
    if not cfg.tie_word_embeddings:
        arrays.append(((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab")))
    for shape, axes in layer_param_specs(cfg).values():
        arrays.append(((cfg.num_hidden_layers, *shape), ("layers", *axes)))
    return arrays


def shard_divisor(names, shape, sizes: dict[str, int], rules=parallel.LOGICAL_RULES) -> int:
    """How many ways an array is split on a mesh with these axis sizes: the product of the mesh
    axes that parallel.logical_to_spec (the trainer's own rule) gives it; only the sizes count."""
    spec = parallel.logical_to_spec(names, shape, types.SimpleNamespace(shape=sizes), rules,
                                    report=False)  # a plan of many meshes: no warnings
    axes = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(sizes[a] for a in axes)


def per_device(names, shape, sizes, rules=parallel.LOGICAL_RULES) -> float:
    """Elements of the array one device holds."""
    return math.prod(shape) / shard_divisor(names, shape, sizes, rules)


# The sampler's copy with mesh.sampler_reshard (gathered over fsdp, still split over tensor).
SAMPLER_RULES = parallel.SAMPLER_RULES


# ---------------------------------------------------------------- the mesh

@dataclasses.dataclass(frozen=True)
class MeshPlan:
    ici: tuple[int, int, int]   # data, fsdp, tensor within a slice
    dcn: tuple[int, int, int]   # slices along each axis
    devices: int                # all devices of all slices

    @property
    def sizes(self) -> dict[str, int]:
        return {a: i * d for a, i, d in zip(parallel.MESH_AXES, self.ici, self.dcn)}

    @property
    def batch_shards(self) -> int:
        return self.sizes["data"] * self.sizes["fsdp"]

    @property
    def slices(self) -> int:
        return math.prod(self.dcn)


def resolve_mesh(mesh_cfg, slice_: Slice) -> MeshPlan:
    """The run's mesh on `slice_`: data/fsdp/tensor within a slice (one may be -1, the rest),
    dcn_* slices along each axis; the same sizes parallel.mesh_from_config builds."""
    get = lambda name, default: getattr(mesh_cfg, name, default)  # noqa: E731  (a spec or a ConfigDict)
    dcn = (get("dcn_data", 1), get("dcn_fsdp", 1), get("dcn_tensor", 1))
    per_slice = get("devices", 0) or slice_.chips
    sizes = [get("data", 1), get("fsdp", -1), get("tensor", 1)]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh (data, fsdp, tensor) = {sizes}: sizes must be positive, at most "
                         f"one -1 (the rest of the devices)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and per_slice % known == 0:
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ValueError(f"mesh (data, fsdp, tensor) = {tuple(get(a, 1) for a in parallel.MESH_AXES)} "
                         f"does not fit the {per_slice} devices of a {slice_.name} slice "
                         f"({slice_.chips} chips, one JAX device each)")
    return MeshPlan(tuple(sizes), dcn, per_slice * math.prod(dcn))
