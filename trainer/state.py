"""The train state: params (pure dicts), optimizer state and step, created sharded.

Mixed precision: the params are float32 master weights and the optimizer state (Adam moments) is
float32, whatever the model's compute dtype; the jitted steps cast the masters to
``StateLayout.compute_dtype`` for the forward (trainer.learner), checkpoints hold the masters,
and publishing casts to config.store.publish_dtype.

Params are plain nested dicts of arrays (``nnx.to_pure_dict``): optax, orbax and the param server
all see the same plain pytree, and ``nnx.merge(graphdef, params)`` rebuilds the model inside jit.
The trainable tree is ``{"model": ...}`` plus ``{"value": ...}`` when the loss needs a value head
(PPO with GAE); only ``"model"`` is published to workers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlax_tpu import rl, sharding
from trainer.optim import opt_state_shardings


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Static facts about the train state: graph definitions and shardings."""

    graphdef: Any  # the model's nnx graphdef
    value_graphdef: Any  # the value head's, or None
    shardings: Any  # pytree of NamedSharding matching the state
    compute_dtype: Any  # the forward's dtype (ModelConfig.dtype); params stay float32


def _value_head(model_cfg, seed: int):
    return rl.ValueHead(model_cfg.hidden_size, rngs=nnx.Rngs(seed), param_dtype=jnp.float32)


def _masters(params: Any) -> Any:
    """Floating params as float32 (in place when they already are), each in its own sharding."""
    def f32(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.float32:
            return x
        return jax.jit(lambda a: a.astype(jnp.float32), out_shardings=x.sharding)(x)

    return jax.tree.map(f32, params)


def create_state(model, model_cfg, mesh: jax.sharding.Mesh, optimizer: optax.GradientTransformation, *,
                 seed: int, with_value_head: bool) -> tuple[dict, StateLayout]:
    """The initial train state around an already sharded model (see sharding.create_sharded):
    float32 master weights and optimizer state whatever dtype the model's params are in."""
    graphdef, params_state = nnx.split(model)
    trainable = {"model": _masters(nnx.to_pure_dict(params_state))}
    value_graphdef = None
    if with_value_head:
        head = _value_head(model_cfg, seed + 1)
        value_graphdef, vstate = nnx.split(head)
        vshard = sharding.param_shardings(head, mesh, sharding.TRAIN_RULES)
        trainable["value"] = jax.device_put(nnx.to_pure_dict(vstate), nnx.to_pure_dict(vshard))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trainable)
    opt_shardings = opt_state_shardings(optimizer, abstract)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {
        "params": trainable,
        "opt_state": opt_state,
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
    }
    shardings = {
        "params": jax.tree.map(lambda x: x.sharding, trainable),
        "opt_state": opt_shardings,
        "step": replicated,
    }
    return state, StateLayout(graphdef, value_graphdef, shardings, model_cfg.jnp_dtype)


def abstract_state(state: dict) -> dict:
    """ShapeDtypeStructs with shardings: the restore target for orbax."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def reset_optimizer(state: dict, optimizer: optax.GradientTransformation, layout: StateLayout) -> dict:
    """Fresh optimizer moments for the same params (e.g. after the SFT warm start)."""
    init = jax.jit(optimizer.init, out_shardings=layout.shardings["opt_state"])
    return {**state, "opt_state": init(state["params"])}
