"""Meshes, the logical-axis rules, placing values on them, and several processes.

mesh.py (the device mesh), rules.py (logical axis names -> mesh axes), placement.py (one
placement per tensor), hosts.py (multi-process start-up, host <-> global arrays). Nothing
here knows the model: the dependence goes model -> parallel."""
from sspo_jax.parallel.mesh import (  # noqa: F401
    MESH_AXES, make_mesh, mesh_from_config)
from sspo_jax.parallel.rules import (  # noqa: F401
    LOGICAL_RULES, SAMPLER_RULES, batch_shards, constrain, logical_axes, logical_to_spec,
    mesh_of, named_sharding, state_shardings, using_mesh)
from sspo_jax.parallel.placement import (  # noqa: F401
    abstract, shard_model, place, relayout, put_global, put_batch, sampler_params, compute_copy)
from sspo_jax.parallel.hosts import (  # noqa: F401
    initialize, is_chief, to_numpy, process_block, allgather_blocks, define_flags, initialize_from_flags)
