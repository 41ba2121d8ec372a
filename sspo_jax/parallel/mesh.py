"""The device mesh `data x fsdp x tensor` (ICI sizes within a slice, DCN slices outermost)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")


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
    get = lambda name, default: getattr(mesh_cfg, name, default)  # noqa: E731  (a spec or a ConfigDict)
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
