"""Putting values on a mesh: one placement per tensor, never through host NumPy once placed.

- `shard_model` lays a model out by its logical axes; `place` one array; `relayout` a tree of
  arrays already on the mesh (possibly across processes) to new shardings, on device;
- `put_global` places a host value every process holds; `put_batch` a batch, each process
  feeding only the rows its devices hold;
- `abstract` turns arrays into `ShapeDtypeStruct`s with their shardings (what a checkpoint is
  read into); `sampler_params` makes the sampler's copy (gathered over fsdp, compute dtype).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from sspo_jax.parallel.rules import SAMPLER_RULES, logical_axes, state_shardings


def abstract(tree: Any) -> Any:
    """`tree` with every array (or nnx Variable value) as a `jax.ShapeDtypeStruct` carrying its
    sharding: what to read a checkpoint into, without holding any data."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Lays every parameter of `model` out on `mesh` by its logical axes (in place; returns model).

    One placement per tensor: a parameter already laid out as its axes say (e.g. loaded straight
    onto the mesh by `from_pretrained`) is left as it is; one on other devices of the mesh is
    re-laid out on device (`relayout`); a local one (a model built on one device, the same on
    every process from the seed) is placed from this process's copy.
    """
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    values = jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, jax.tree.map(place, values, shardings))
    return model


def place(value: Any, sharding: NamedSharding) -> jax.Array:
    """`value` with `sharding`: itself when it already has it; a process-spanning array re-laid
    out on device (never through host NumPy, which cannot read other hosts' shards); a local
    value (the same on every process) placed from this process's copy."""
    if isinstance(value, jax.Array):
        if value.sharding.is_equivalent_to(sharding, value.ndim):
            return value
        if not value.is_fully_addressable:
            return relayout(value, sharding)
    return put_global(value, sharding)


def relayout(tree: Any, shardings: Any, dtypes: Any = None) -> Any:
    """`tree` (arrays on the mesh, possibly across processes) laid out as `shardings`, on
    device: one jitted program, so every process moves only its devices' shards. `shardings`
    (and `dtypes`, if given: the dtype each array should have, cast in the same program) are
    prefix trees of `tree` with one entry per array. The program is compiled once per layout."""
    leaves, treedef = jax.tree.flatten(tree)
    targets = tuple(jax.tree.leaves(shardings))
    casts = None if dtypes is None else tuple(jnp.dtype(d) for d in jax.tree.leaves(dtypes))
    if len(targets) != len(leaves) or (casts is not None and len(casts) != len(leaves)):
        raise ValueError(f"relayout: {len(leaves)} arrays but {len(targets)} shardings"
                         + ("" if casts is None else f" and {len(casts)} dtypes"))
    return jax.tree.unflatten(treedef, _relayout_program(targets, casts)(leaves))


@functools.lru_cache(maxsize=32)
def _relayout_program(shardings: tuple, dtypes: tuple | None):
    def move(leaves):
        return leaves if dtypes is None else [x.astype(d) for x, d in zip(leaves, dtypes)]

    return jax.jit(move, out_shardings=list(shardings))


def put_global(value: Any, sharding: NamedSharding) -> jax.Array:
    """`value` (the same on every process, readable here) placed with `sharding`, which may
    span processes."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_batch(value: Any, sharding: NamedSharding) -> jax.Array:
    """A batch whose rows are split as `sharding` says, from the global batch that every process
    holds (the prompt stream is global, so a run does not depend on the number of processes).

    Each process feeds JAX only its own share: the rows its devices hold, in order.
    """
    host = np.asarray(value)
    if sharding.is_fully_addressable:
        return jax.device_put(host, sharding)
    blocks = sorted({index[0].indices(host.shape[0])[:2]
                     for index in sharding.addressable_devices_indices_map(host.shape).values()})
    local = np.concatenate([host[start:stop] for start, stop in blocks])
    return jax.make_array_from_process_local_data(sharding, local, host.shape)


def sampler_params(params: Any, abstract_state: Any, mesh: Mesh, dtype: Any) -> Any:
    """The sampler's copy of `params`: laid out by SAMPLER_RULES and, in one program, cast to
    the compute `dtype` (`abstract_state`: the model's nnx State, whose Variables carry the
    logical axes). Norm weights keep their dtype: the forward computes norms in float32 and
    casts every other weight to the compute dtype itself, so the copy samples exactly as the
    training parameters do, from half the bytes in bf16."""
    shardings = state_shardings(abstract_state, mesh, SAMPLER_RULES)
    return relayout(params, shardings, _compute_dtypes(abstract_state, dtype))


def compute_copy(params: Any, abstract_state: Any, dtype: Any) -> Any:
    """`params` cast to the compute `dtype` once, each array keeping its layout (norm weights
    keep theirs, as in sampler_params): what a decode loop reads when the weights stay sharded,
    so no step casts (or all-gathers) float32 master weights again."""
    shardings = jax.tree.map(lambda a: a.sharding, params)
    return relayout(params, shardings, _compute_dtypes(abstract_state, dtype))


def _compute_dtypes(abstract_state: Any, dtype: Any) -> Any:
    def target(variable):
        keep = "norm" in (logical_axes(variable) or ()) or not jnp.issubdtype(variable.dtype, jnp.floating)
        return jnp.dtype(variable.dtype if keep else dtype)

    return jax.tree.map(target, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
