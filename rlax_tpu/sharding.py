"""Device mesh, logical-axis rules and the shardings they give params and batches.

Params carry logical axis names (``out_sharding`` metadata on each nnx.Param). A rules table
maps each logical name to a mesh axis (or a tuple of axes, or None = replicated):
- TRAIN_RULES: FSDP over 'fsdp' on the embed dimension + tensor parallelism over 'tensor'.
- INFERENCE_RULES: tensor parallelism only; nothing on 'fsdp' (weights replicated across it).

Dimensions that a mesh axis does not divide: by default that dimension is replicated instead
(e.g. 2 KV heads on tensor=4), so any checkpoint runs on any mesh; pass ``strict=True`` to get
a ShardingError naming the param, dimension and mesh axis instead. A mesh axis used by an
earlier dimension of the same param is not reused (the later dimension is replicated), and
mesh axes of size 1 are left out of the PartitionSpecs.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.tree import path_str

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

TRAIN_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
)
INFERENCE_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", None),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
)


class ShardingError(ValueError):
    """A param cannot be laid out on the mesh as the rules ask (strict mode)."""


def make_mesh(mesh_section, devices=None) -> Mesh:
    """Mesh over ('data', 'fsdp', 'tensor') from config.mesh; one axis may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_section[a]) for a in AXES]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ConfigError("mesh", f"at most one axis may be -1, got {dict(zip(AXES, sizes, strict=True))}")
    if -1 in sizes:
        known = prod(s for s in sizes if s != -1)
        if known <= 0 or n % known:
            raise ConfigError(f"mesh.{AXES[sizes.index(-1)]}",
                              f"-1 cannot fill: {n} devices are not a multiple of {known}")
        sizes[sizes.index(-1)] = n // known
    if prod(sizes) != n:
        raise ConfigError("mesh", f"axis sizes {dict(zip(AXES, sizes, strict=True))} multiply to "
                          f"{prod(sizes)}, but there are {n} devices")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def _spec(logical: Sequence[str | None], mesh: Mesh, rules: Rules, shape=None, name: str = "",
          strict: bool = False) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, lname in enumerate(logical):
        target = table.get(lname) if lname is not None else None
        if lname is not None and lname not in table:
            raise ShardingError(f"param {name or '?'}: logical axis {lname!r} has no rule in the table")
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        # Size-1 mesh axes are dropped: same layout, simpler specs.
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = prod(mesh.shape[a] for a in axes)
        if shape is not None and axes and shape[dim] % size:
            if strict:
                raise ShardingError(f"param {name}: dimension {dim} ({lname}, size {shape[dim]}) is not "
                                    f"divisible by mesh axis {axes} of size {size}")
            axes = ()
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*out)


def param_shardings(model_or_state, mesh: Mesh, rules: Rules, *, strict: bool = False):
    """NamedSharding for every Variable of a model (or nnx.State), as an nnx.State whose
    Variables hold NamedShardings: usable as jit in/out_shardings for ``nnx.state(model)``.
    Variables without logical axes are replicated."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)

    def one(path, var):
        value = var.get_value()
        axes = var.get_metadata().get("out_sharding") or (None,) * len(value.shape)
        spec = _spec(axes, mesh, rules, value.shape, path_str(path), strict)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch-major arrays: dim 0 over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))
