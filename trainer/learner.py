"""The learner: jit-compiled SFT and RL steps and the log-prob recompute, sharded on the mesh.

Every step is a plain function of (state, batch) under ``jax.jit`` with explicit in/out
shardings; the train state is donated, so params and optimizer moments are updated in place.
Batches are numpy on the host and placed once with the batch sharding before the call; the call
itself runs under ``jax.transfer_guard("disallow")`` so an accidental host<->device copy inside a
step fails loudly instead of silently slowing training down.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlax_tpu import rl, sharding
from rlax_tpu.models.logprobs import chunked_target_logprobs
from trainer.state import StateLayout

SEQ_KEYS = ("tokens", "targets", "positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class LearnerSpec:
    """Static settings of the compiled steps."""

    micro_batches: int
    logprob_chunk: int
    remat: bool
    compute_entropy: bool


def _model_forward(graphdef, params, mb, spec: LearnerSpec, value_graphdef=None, value_params=None,
                   return_entropy=False):
    """Per-token log-probs of mb['targets'] (and entropy, values) without full [B,T,V] logits."""
    model = nnx.merge(graphdef, params)
    h = model.hidden(mb["tokens"], mb["positions"], mb["segment_ids"], remat=spec.remat)
    out = chunked_target_logprobs(h, model.output_weight(), mb["targets"], spec.logprob_chunk,
                                  return_entropy)
    logp, ent = out if return_entropy else (out, None)
    values = None
    if value_graphdef is not None:
        values = nnx.merge(value_graphdef, value_params)(h)
    return logp, ent, values


def _split(batch: dict, m: int, i: int) -> dict:
    return {k: jax.tree.map(lambda x: x[i * (x.shape[0] // m):(i + 1) * (x.shape[0] // m)], v)
            for k, v in batch.items()}


def _accumulate(loss_and_grad, params, batch: dict, m: int, weights=None):
    """Combines grads and metrics over m micro-batches: the same update with less memory.

    ``weights[i]`` is micro-batch i's share of the whole batch's loss (default 1/m: equal rows,
    exact for per-sequence means); token means pass each micro-batch's share of the tokens so the
    result equals the whole batch's token mean.
    """
    grads, metrics = None, None
    for i in range(m):
        w = (1.0 / m) if weights is None else weights[i]
        (_, mets), g = loss_and_grad(params, _split(batch, m, i) if m > 1 else batch)
        g, mets = jax.tree.map(functools.partial(jnp.multiply, w), (g, mets))
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        metrics = mets if metrics is None else jax.tree.map(jnp.add, metrics, mets)
    return grads, metrics


def _token_shares(mask: jax.Array, m: int) -> list[jax.Array]:
    counts = mask.astype(jnp.float32).reshape(m, -1).sum(axis=1)
    shares = counts / jnp.maximum(counts.sum(), 1.0)
    return [shares[i] for i in range(m)]


def _apply(state, grads, optimizer):
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}


def sft_step(state, batch, *, layout: StateLayout, optimizer, spec: LearnerSpec):
    """Next-token NLL on the answer tokens (batch['mask']), prompt tokens masked out."""

    def loss_fn(trainable, mb):
        logp, _, _ = _model_forward(layout.graphdef, trainable["model"], mb, spec)
        mask = mb["mask"].astype(jnp.float32)
        n = jnp.maximum(mask.sum(), 1.0)
        nll = -(logp * mask).sum() / n
        return nll, {"sft/nll": nll, "sft/tokens": mask.sum()}

    m = spec.micro_batches
    grads, metrics = _accumulate(jax.value_and_grad(loss_fn, has_aux=True), state["params"], batch, m,
                                 _token_shares(batch["mask"], m) if m > 1 else None)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return _apply(state, grads, optimizer), metrics


def rl_step(state, batch, *, layout: StateLayout, optimizer, spec: LearnerSpec, loss: rl.RLLoss):
    """One RL update. Advantages are computed on the whole batch first (groups never straddle
    micro-batches), then the loss is accumulated over micro-batches."""
    s = loss.settings
    batch = rl.with_advantages(s, batch)

    def loss_fn(trainable, mb):
        logp, ent, values = _model_forward(layout.graphdef, trainable["model"], mb, spec,
                                           layout.value_graphdef, trainable.get("value"),
                                           return_entropy=spec.compute_entropy)
        return loss(logp, mb, values=values, entropy=ent)

    m = spec.micro_batches
    weights = _token_shares(batch["mask"], m) if m > 1 and s.loss_agg == "token_mean" else None
    grads, metrics = _accumulate(jax.value_and_grad(loss_fn, has_aux=True), state["params"], batch, m,
                                 weights)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["reward_shaped_mean"] = jnp.mean(batch["shaped_rewards"])
    return _apply(state, grads, optimizer), metrics


def ref_logprobs(model_params, batch, *, layout: StateLayout, spec: LearnerSpec):
    """The frozen reference policy's log-probs (for the KL term); the model alone, no value head."""
    return _model_forward(layout.graphdef, model_params, batch, spec)[0]


def recompute(params, batch, *, layout: StateLayout, spec: LearnerSpec):
    """The proximal ("old") policy's log-probs (and values) of a batch, without gradients."""
    logp, _, values = _model_forward(layout.graphdef, params["model"], batch, spec,
                                     layout.value_graphdef, params.get("value"))
    return logp, values


class Learner:
    """Owns the compiled steps for one mesh, layout and optimizer."""

    def __init__(self, mesh: jax.sharding.Mesh, layout: StateLayout, optimizer: optax.GradientTransformation,
                 spec: LearnerSpec, loss: rl.RLLoss | None):
        self.mesh, self.layout, self.spec = mesh, layout, spec
        self.batch_sharding = sharding.batch_sharding(mesh, 2)
        self.row_sharding = sharding.batch_sharding(mesh, 1)
        state_sh = layout.shardings
        self._sft = jax.jit(functools.partial(sft_step, layout=layout, optimizer=optimizer, spec=spec),
                            in_shardings=(state_sh, None), out_shardings=(state_sh, None),
                            donate_argnums=(0,))
        self._rl = None
        if loss is not None:
            self._rl = jax.jit(functools.partial(rl_step, layout=layout, optimizer=optimizer, spec=spec,
                                                 loss=loss),
                               in_shardings=(state_sh, None), out_shardings=(state_sh, None),
                               donate_argnums=(0,))
        self._recompute = jax.jit(functools.partial(recompute, layout=layout, spec=spec),
                                  in_shardings=(state_sh["params"], None))
        self._ref = jax.jit(functools.partial(ref_logprobs, layout=layout, spec=spec),
                            in_shardings=(state_sh["params"]["model"], None))

    def place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Puts a host batch on the mesh: rows over ('data', 'fsdp')."""
        placed = {}
        for k, v in batch.items():
            sh = self.batch_sharding if v.ndim == 2 else self.row_sharding
            placed[k] = jax.device_put(v, sh)
        return placed

    def sft_step(self, state, batch):
        with jax.transfer_guard("disallow"):
            return self._sft(state, batch)

    def rl_step(self, state, batch):
        with jax.transfer_guard("disallow"):
            return self._rl(state, batch)

    def recompute(self, params, batch):
        with jax.transfer_guard("disallow"):
            return self._recompute(params, batch)

    def ref_logprobs(self, model_params, batch):
        with jax.transfer_guard("disallow"):
            return self._ref(model_params, batch)


def check_batch_divides_mesh(rows: int, mesh: jax.sharding.Mesh, micro_batches: int, field: str) -> None:
    """A clear start-up error when the batch cannot be split over the mesh."""
    from rlax_tpu.config import ConfigError

    shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if rows % (shards * micro_batches):
        raise ConfigError(field, f"the batch of {rows} sequences must be divisible by data*fsdp={shards} "
                                 f"x trainer.micro_batches={micro_batches} (mesh {dict(mesh.shape)})")


def to_host(tree):
    """Numpy copies of (possibly multi-host) global arrays; a collective when they span processes."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)
