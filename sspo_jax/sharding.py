"""Device mesh and the one table that maps logical axis names to mesh axes.

Models name every parameter and main activation axis logically (`embed`, `heads`, ...); this
module alone decides where those names go on the mesh (`data`, `fsdp`, `tensor`). It imports no
model: the dependence goes model -> sharding.

A mesh axis is dropped from a dimension (that dimension is replicated over it) when the mesh
axis size does not divide the dimension, or when an earlier dimension already uses that mesh
axis. So an odd vocabulary or 2 kv heads on a 4-way tensor axis still works, replicated.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
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


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None,
              *, dcn: Sequence[int] = (1, 1, 1)) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all, every process's).

    data/fsdp/tensor are the sizes within a slice (one may be -1: the rest). `dcn` gives the
    number of slices along each axis for multi-slice runs: axis i spans `dcn[i] * size[i]` devices,
    with the slices (joined by the slow data-center network) outermost, so only the axis that
    crosses slices (usually `data`) communicates over DCN. Device order comes from
    `jax.experimental.mesh_utils`, which knows the TPU interconnect topology.
    """
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    dcn = tuple(int(d) for d in dcn)
    if len(dcn) != 3 or any(d < 1 for d in dcn):
        raise ValueError(f"make_mesh: dcn must be three sizes >= 1 (data, fsdp, tensor), got {dcn}")
    slices = math.prod(dcn)
    if len(devices) % slices:
        raise ValueError(f"make_mesh: {len(devices)} devices do not split into {slices} slices (dcn={dcn})")
    ici = _resolve_sizes([data, fsdp, tensor], len(devices) // slices)
    if slices == 1:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=not hasattr(devices[0], "slice_index"),
            allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def _resolve_sizes(sizes: list[int], num_devices: int) -> tuple[int, ...]:
    """Replace the one -1 in `sizes` by what is left of `num_devices`; check the product."""
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"make_mesh: mesh sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"make_mesh: {num_devices} devices do not split into data x fsdp x tensor = {sizes}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"make_mesh: data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices are given "
            "(per slice); use -1 for one axis to take the rest")
    return tuple(sizes)


def mesh_from_config(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh of a run config's `mesh` block: data/fsdp/tensor within a slice, dcn_* across
    slices, `devices` > 0 to use only the first that many devices (one process only).

    Raises ValueError naming the mesh fields when they do not fit the devices.
    """
    get = mesh_cfg.get
    devices = list(jax.devices() if devices is None else devices)
    wanted = get("devices", 0) or len(devices)
    if wanted > len(devices) or (wanted < len(devices) and jax.process_count() > 1):
        raise ValueError(f"bad config: mesh.devices={wanted} but {len(devices)} devices are here "
                         f"(0 = all; a multi-process run must use all)")
    dcn = (get("dcn_data", 1), get("dcn_fsdp", 1), get("dcn_tensor", 1))
    try:
        return make_mesh(get("data", 1), get("fsdp", -1), get("tensor", 1), devices[:wanted], dcn=dcn)
    except ValueError as e:
        raise ValueError(f"bad config: mesh (data={get('data', 1)}, fsdp={get('fsdp', -1)}, "
                         f"tensor={get('tensor', 1)}, dcn={dcn}) does not fit {wanted} devices: {e}") from e


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch axis is split (the data-parallel degree: data x fsdp)."""
    return math.prod(mesh.shape[a] for a in _as_tuple(LOGICAL_RULES["batch"]) if a in mesh.shape)


def _as_tuple(target) -> tuple[str, ...]:
    return () if target is None else ((target,) if isinstance(target, str) else tuple(target))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: dict | None = None) -> PartitionSpec:
    """PartitionSpec for logical axis `names` by LOGICAL_RULES.

    With `shape` and `mesh`, mesh axes that do not divide a dimension are dropped (replicated).
    `rules` replaces LOGICAL_RULES (e.g. SAMPLER_RULES).
    """
    rules = LOGICAL_RULES if rules is None else rules
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"unknown logical axis name {name!r}; add it to sspo_jax.sharding.LOGICAL_RULES")
        axes = _as_tuple(rules[name])
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


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int],
                   rules: dict | None = None) -> NamedSharding:
    """NamedSharding on `mesh` for an array of `shape` whose axes are called `names`."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def abstract(tree: Any) -> Any:
    """`tree` with every array (or nnx Variable value) as a `jax.ShapeDtypeStruct` carrying its
    sharding: what to read a checkpoint into, without holding any data."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


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


def state_shardings(state: Any, mesh: Mesh, rules: dict | None = None) -> Any:
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
    if hasattr(model, "mesh"):
        model.mesh = mesh
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


# For decoding, FSDP-sharded weights would be all-gathered layer by layer at every decode step.
# The sampler may instead get a copy gathered over fsdp once per RL step (sharded over tensor
# only): one more copy of the weights per device, no per-token weight traffic.
SAMPLER_RULES = {**LOGICAL_RULES, "embed": None}


def sampler_params(params: Any, abstract_state: Any, mesh: Mesh, dtype: Any) -> Any:
    """The sampler's copy of `params`: laid out by SAMPLER_RULES and, in one program, cast to
    the compute `dtype` (`abstract_state`: the model's nnx State, whose Variables carry the
    logical axes). Norm weights keep their dtype: the forward computes norms in float32 and
    casts every other weight to the compute dtype itself, so the copy samples exactly as the
    training parameters do, from half the bytes in bf16."""
    shardings = state_shardings(abstract_state, mesh, SAMPLER_RULES)

    def target(variable):
        keep = "norm" in (logical_axes(variable) or ()) or not jnp.issubdtype(variable.dtype, jnp.floating)
        return jnp.dtype(variable.dtype if keep else dtype)

    dtypes = jax.tree.map(target, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return relayout(params, shardings, dtypes)
