"""The memory plan and cost model on paper: `python -m sspo_jax.plan` (shapes.py: one RL step's
shapes, memory.py: the memory plan, costs.py: the FLOPs, bytes and times, and the plan,
mesh.py: parameter counts and per-device shares, tables.py: chips, known models, the report)."""
from sspo_jax.plan.shapes import Shapes, rollout_shapes  # noqa: F401
from sspo_jax.plan.memory import Item, Model, memory_plan, phase_totals  # noqa: F401
from sspo_jax.plan.costs import (  # noqa: F401
    Costs, forward_flops, cost_model, Times, step_times, Plan, analyse, render)
from sspo_jax.plan.mesh import (  # noqa: F401
    param_count, matmul_params, param_arrays, shard_divisor, per_device, SAMPLER_RULES, MeshPlan, resolve_mesh)
from sspo_jax.plan.tables import (  # noqa: F401
    GIB, FIT_FRACTION, TRAIN_MFU, DECODE_EFFICIENCY, DTYPE_BYTES, Chip, CHIPS, FAMILY_ALIASES, Slice, parse_slice, KNOWN_MODELS, model_config, SHARD_MORE, FEWER_ROWS, problems, gib, report)
