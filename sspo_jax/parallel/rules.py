"""The one table that maps logical axis names to mesh axes, and what follows from it.

Models name every parameter and main activation axis logically (`embed`, `heads`, ...); this
module alone decides where those names go on the mesh (`data`, `fsdp`, `tensor`). It imports no
model: the dependence goes model -> parallel.

A mesh axis is dropped from a dimension (that dimension is replicated over it) when the mesh
axis size does not divide the dimension, or when an earlier dimension already uses that mesh
axis. So an odd vocabulary or 2 kv heads on a 4-way tensor axis still works, replicated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> the mesh axes that split it (none: replicated), as a value: passed
    where it is used (hashable, so it can be a static jit argument), never a global to patch."""
    table: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def of(cls, **rules: str | tuple[str, ...] | None) -> "ShardingRules":
        return cls(tuple((name, _as_tuple(axes)) for name, axes in rules.items()))

    def __getitem__(self, name: str) -> tuple[str, ...]:
        for key, axes in self.table:
            if key == name:
                return axes
        raise KeyError(f"unknown logical axis name {name!r}; the rules name {[k for k, _ in self.table]}")

    def __contains__(self, name: str) -> bool:
        return any(key == name for key, _ in self.table)

    def replace(self, **changes: str | tuple[str, ...] | None) -> "ShardingRules":
        """These rules with some names mapped elsewhere (e.g. `embed=None`: not split)."""
        unknown = sorted(set(changes) - {k for k, _ in self.table})
        if unknown:
            raise KeyError(f"unknown logical axis name(s) {unknown}")
        return ShardingRules(tuple((k, _as_tuple(changes[k]) if k in changes else v) for k, v in self.table))


def _as_tuple(target) -> tuple[str, ...]:
    return () if target is None else ((target,) if isinstance(target, str) else tuple(target))


LOGICAL_RULES = ShardingRules.of(
    # parameters
    layers=None,
    vocab="tensor",
    embed="fsdp",
    heads="tensor",         # q heads * head_dim, flattened
    kv_heads="tensor",      # kv heads * head_dim, flattened
    mlp="tensor",
    norm=None,
    # activations
    batch=("data", "fsdp"),
    seq=None,
    kv_seq=None,
    act_embed=None,
    head_dim=None,
)
# For decoding, FSDP-sharded weights would be all-gathered layer by layer at every decode step.
# The sampler may instead get a copy gathered over fsdp once per RL step (sharded over tensor
# only): one more copy of the weights per device, no per-token weight traffic.
SAMPLER_RULES = LOGICAL_RULES.replace(embed=None)

_reported: set[tuple] = set()


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch axis is split (the data-parallel degree: data x fsdp)."""
    return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"] if a in mesh.shape)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: ShardingRules = LOGICAL_RULES,
                    report: bool = True) -> PartitionSpec:
    """PartitionSpec for logical axis `names` by `rules` (default LOGICAL_RULES).

    With `shape` and `mesh`, a mesh axis that does not divide a dimension is dropped (that
    dimension is replicated over it) and, with `report`, said once per case in a warning.
    """
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"unknown logical axis name {name!r}; add it to sspo_jax.parallel.LOGICAL_RULES")
        axes = rules[name]
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
                    if report and (name, shape[dim], ax, n) not in _reported:
                        _reported.add((name, shape[dim], ax, n))
                        log.warning("sharding: %s of size %d does not split over mesh axis %s (%d "
                                    "devices): replicated over it", name, shape[dim], ax, n)
                    continue
                size //= n
            kept.append(ax)
            used.add(ax)
        spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int],
                   rules: ShardingRules = LOGICAL_RULES) -> NamedSharding:
    """NamedSharding on `mesh` for an array of `shape` whose axes are called `names`."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names on the context mesh (`using_mesh`, or
    `jax.set_mesh`); a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def using_mesh(mesh: Mesh | None):
    """The context under which model code constrains its activations to `mesh`
    (`jax.set_mesh`); nothing for None (one device). Enter it outside jit, around the call."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh the arrays of `tree` are laid out on (NamedSharding), or None when they are
    on single devices: how a function finds its mesh from the values it is given."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a Variable was annotated with (flax's `out_sharding` metadata)."""
    return variable.get_metadata().get("out_sharding")


def state_shardings(state: Any, mesh: Mesh, rules: ShardingRules = LOGICAL_RULES) -> Any:
    """NamedSharding pytree for an nnx State (real or abstract) from each Variable's logical axes.

    Variables without annotations are replicated.
    """
    def one(v):
        names = logical_axes(v) if isinstance(v, nnx.Variable) else None
        shape = v.shape
        if names is None:
            return NamedSharding(mesh, PartitionSpec())
        return named_sharding(mesh, names, shape, rules)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
