"""The train state: params (pure dicts), optimizer state and step, created sharded.

Mixed precision: the params are float32 master weights and the optimizer state (Adam moments) is
float32, whatever the model's compute dtype; the jitted steps cast the masters to
``StateLayout.compute_dtype`` for the forward (trainer.learner), checkpoints hold the masters,
and publishing casts to config.store.publish_dtype.

Params are plain nested dicts of arrays (``nnx.to_pure_dict``): optax, orbax and the param server
all see the same plain pytree, and ``nnx.merge(graphdef, params)`` rebuilds the model inside jit.
The trainable tree is ``{"model": ...}`` plus ``{"value": ...}`` when the loss needs a value head
(PPO with GAE); only ``"model"`` is published to workers.

LoRA (config.lora.rank > 0): ``"model"`` holds the adapters only (float32 masters, the only
leaves the optimizer sees) and ``state["base"]`` the frozen base weights in the compute dtype: a
weight that never updates needs no float32 master (nothing accumulates into it), so the base
costs its compute-dtype bytes once and no cast per step. The base is never checkpointed (it is
the starting checkpoint's weights, rebuilt at start-up) nor donated away (steps return it as is).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlax_tpu import models, rl, sharding
from trainer.optim import opt_state_shardings


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Static facts about the train state: graph definitions and shardings."""

    graphdef: Any  # the model's nnx graphdef
    value_graphdef: Any  # the value head's, or None
    shardings: Any  # pytree of NamedSharding matching the state
    compute_dtype: Any  # the forward's dtype (ModelConfig.dtype); params stay float32
    seed: int  # config.seed, the state's init seed and the root of the LoRA dropout masks
    lora: Any = None  # the models.LoraSpec of a LoRA policy, or None (full fine-tuning)


def _value_head(model_cfg, seed: int):
    return rl.ValueHead(model_cfg.hidden_size, rngs=nnx.Rngs(seed), param_dtype=jnp.float32)


def _masters(params: Any) -> Any:
    """Floating params as float32 (in place when they already are), each in its own sharding."""
    def f32(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.float32:
            return x
        return jax.jit(lambda a: a.astype(jnp.float32), out_shardings=x.sharding)(x)

    return jax.tree.map(f32, params)


def _frozen(params: Any, dtype) -> Any:
    """Floating params in the compute dtype, each in its own sharding (the frozen LoRA base)."""
    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        return jax.jit(lambda a: a.astype(dtype), out_shardings=x.sharding)(x)

    return jax.tree.map(cast, params)


def create_state(model, model_cfg, mesh: jax.sharding.Mesh, optimizer: optax.GradientTransformation, *,
                 seed: int, with_value_head: bool, lora_spec=None) -> tuple[dict, StateLayout]:
    """The initial train state around an already sharded model (see sharding.create_sharded):
    float32 master weights and optimizer state whatever dtype the model's params are in. With
    ``lora_spec`` the model is the frozen base and the trainable policy its fresh adapters."""
    graphdef, params_state = nnx.split(model)
    base = None
    if lora_spec is None:
        trainable = {"model": _masters(nnx.to_pure_dict(params_state))}
    else:
        graphdef = models.lora_graphdef(model_cfg, lora_spec)
        base = _frozen(nnx.to_pure_dict(params_state), model_cfg.jnp_dtype)
        trainable = {"model": models.init_adapters(model_cfg, lora_spec, seed + 2, mesh=mesh)}
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
    if base is not None:
        state["base"] = base
        shardings["base"] = jax.tree.map(lambda x: x.sharding, base)
    return state, StateLayout(graphdef, value_graphdef, shardings, model_cfg.jnp_dtype, seed, lora_spec)


def abstract_state(state: dict) -> dict:
    """ShapeDtypeStructs with shardings: the restore target for orbax."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def reset_optimizer(state: dict, optimizer: optax.GradientTransformation, layout: StateLayout) -> dict:
    """Fresh optimizer moments for the same params (e.g. after the SFT warm start)."""
    init = jax.jit(optimizer.init, out_shardings=layout.shardings["opt_state"])
    return {**state, "opt_state": init(state["params"])}
