"""Device mesh and the one table that maps logical axis names to mesh axes.

Models name every parameter and main activation axis logically (`embed`, `heads`, ...); this
module alone decides where those names go on the mesh (`data`, `fsdp`, `tensor`). It imports no
model: the dependence goes model -> sharding.

A mesh axis is dropped from a dimension (that dimension is replicated over it) when the mesh
axis size does not divide the dimension, or when an earlier dimension already uses that mesh
axis. So an odd vocabulary or 2 kv heads on a 4-way tensor axis still works, replicated.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",      # q heads * head_dim, flattened
    "kv_heads": "tensor",   # kv heads * head_dim, flattened
    "mlp": "tensor",
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "kv_seq": None,
    "act_embed": None,
    "head_dim": None,
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all). One size may be -1: the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"make_mesh: mesh sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices do not split into data x fsdp x tensor = {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"make_mesh: data*fsdp*tensor = {math.prod(sizes)} but {len(devices)} devices are given; "
            "use -1 for one axis to take the rest")
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical axis `names` by LOGICAL_RULES.

    With `shape` and `mesh`, mesh axes that do not divide a dimension are dropped (replicated).
    """
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"unknown logical axis name {name!r}; add it to sspo_jax.sharding.LOGICAL_RULES")
        target = LOGICAL_RULES[name]
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        kept = []
        size = None if shape is None else shape[dim]
        for ax in axes:
            if ax in used:
                continue
            if mesh is not None and ax not in mesh.shape:
                continue
            if size is not None and mesh is not None:
                n = mesh.shape[ax]
                if size % n:
                    continue
                size //= n
            kept.append(ax)
            used.add(ax)
        spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    """NamedSharding on `mesh` for an array of `shape` whose axes are called `names`."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def _context_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None = None) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op without a mesh (given or in context)."""
    if mesh is None:
        mesh = _context_mesh()
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape))


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a Variable was annotated with (flax's `out_sharding` metadata)."""
    return variable.get_metadata().get("out_sharding")


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedSharding pytree for an nnx State (real or abstract) from each Variable's logical axes.

    Variables without annotations are replicated.
    """
    def one(v):
        names = logical_axes(v) if isinstance(v, nnx.Variable) else None
        shape = v.shape
        if names is None:
            return NamedSharding(mesh, PartitionSpec())
        return named_sharding(mesh, names, shape)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves every parameter of `model` onto `mesh` by its logical axes (in place; returns model)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    values = jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    placed = jax.tree.map(jax.device_put, values, shardings)
    nnx.update(model, placed)
    if hasattr(model, "mesh"):
        model.mesh = mesh
    return model
