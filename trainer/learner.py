"""The learner: jit-compiled SFT and RL steps and the log-prob recompute, sharded on the mesh.

Every step is a plain function of (state, batch) under ``jax.jit`` with explicit in/out
shardings; the train state is donated, so params and optimizer moments are updated in place.
Batches are numpy on the host, packed (batching.pack: the model runs on packed rows, the loss on
the per-sample view) and placed once with the batch sharding before the call; the call itself
runs under ``jax.transfer_guard("disallow")`` so an accidental host<->device copy inside a
step fails loudly instead of silently slowing training down.

LoRA adapter dropout (config.lora.dropout) runs in the gradient pass of sft_grads and rl_grads
only; its masks come from keys that are a pure function of config.seed, the phase, the trainer
step, the update within the step and the micro-batch (dropout_key), so the state holds no RNG
and a resumed run draws the same masks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlax_tpu import kernels, rl, sharding
from rlax_tpu.models import lora
from rlax_tpu.models.logprobs import chunked_target_logprobs
from trainer import batching
from trainer.state import StateLayout


@dataclasses.dataclass(frozen=True)
class LearnerSpec:
    """Static settings of the compiled steps and of the update schedule (config.rl.ppo_epochs,
    config.rl.mini_batches: the optimizer updates one admitted batch gets)."""

    micro_batches: int
    logprob_chunk: int
    remat: bool
    compute_entropy: bool
    # The distribution the log-probs are under: softmax(logits / temperature), the rollouts'
    # sampling temperature (config.inference.temperature) for RL, 1.0 for SFT's data NLL.
    temperature: float
    ppo_epochs: int
    mini_batches: int
    # config.trainer.pack_len: packed row length of the model's inputs (0: one sample per row).
    pack_len: int

    @property
    def updates_per_batch(self) -> int:
        return self.ppo_epochs * self.mini_batches


# The phases' dropout streams: SFT step i and RL step i draw different masks.
SFT_PHASE, RL_PHASE = 0, 1


def dropout_key(layout: StateLayout, phase: int, step, update=0) -> jax.Array | None:
    """The adapter-dropout key of one optimizer update (micro-batch i folds in i), or None when
    the policy has no adapter dropout. ``step`` and ``update`` may be traced ints."""
    if layout.lora is None or layout.lora.dropout == 0:
        return None
    key = jax.random.key(layout.seed)
    for x in (phase, step, update):
        key = jax.random.fold_in(key, x)
    return key


def _micro_key(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


def _compute_params(params, dtype):
    """The f32 master weights in the compute dtype, inside the jitted step: the forward (and an
    FSDP gather) runs in that dtype while the gradient flows back to the f32 masters."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def model_params(params, base):
    """The model's whole pure dict: ``params`` (the trainable policy leaves) alone, or, with LoRA,
    the frozen ``base`` with the adapters ``params`` beside it (the base is no argument of any
    gradient, so no base gradient is ever computed)."""
    return params if base is None else lora.combine(base, params)


def unpack(x: jax.Array, index: jax.Array, parts: int) -> jax.Array:
    """Packed-row outputs [R, L] -> the per-sample view [N, S] (batching.pack's index map, local
    to each of the ``parts`` micro-batches)."""
    flat = x.reshape(parts, -1)
    return jnp.take_along_axis(flat, index.reshape(parts, -1), axis=1).reshape(index.shape)


def _model_forward(graphdef, params, mb, spec: LearnerSpec, compute_dtype, value_graphdef=None,
                   value_params=None, return_entropy=False, parts=1, dropout_key=None):
    """Per-token log-probs of mb['targets'] under softmax(logits / spec.temperature) (and entropy,
    values) without full [B,T,V] logits; f32 logits and log-probs whatever the compute dtype. Runs
    on the packed rows and returns the per-sample view (``parts``: the micro-batches mb holds).
    ``dropout_key``: the adapter-dropout key of a gradient pass (None: no dropout)."""
    model = nnx.merge(graphdef, _compute_params(params, compute_dtype))
    h = model.hidden(mb["tokens"], mb["positions"], mb["segment_ids"], remat=spec.remat, dropout_key=dropout_key)
    out = chunked_target_logprobs(h, model.output_weight(), mb["targets"], spec.logprob_chunk,
                                  return_entropy, spec.temperature)
    logp, ent = out if return_entropy else (out, None)
    values = None
    if value_graphdef is not None:  # the value head stays f32 (it is tiny)
        values = nnx.merge(value_graphdef, value_params)(h)
    return tuple(None if x is None else unpack(x, mb["pack_index"], parts) for x in (logp, ent, values))


def _split(batch: dict, m: int, i: int) -> dict:
    return {k: jax.tree.map(lambda x: x[i * (x.shape[0] // m):(i + 1) * (x.shape[0] // m)], v)
            for k, v in batch.items()}


def _accumulate(loss_and_grad, params, batch: dict, shares: jax.Array, key: jax.Array | None):
    """Gradients over len(shares) equal row blocks of ``batch`` (micro-batches), block i's scaled
    by ``shares[i]``, its part of the whole batch's loss: the whole batch's gradient with less
    memory; block i's dropout key is ``key`` folded with i. Returns (grads, [metrics of each
    block])."""
    m = shares.shape[0]
    grads, per = None, []
    for i in range(m):
        (_, mets), g = loss_and_grad(params, _split(batch, m, i), _micro_key(key, i))
        g = jax.tree.map(functools.partial(jnp.multiply, shares[i]), g)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        per.append(mets)
    return grads, per


def sft_grads(params, batch, *, layout: StateLayout, spec: LearnerSpec, base=None, key=None):
    """Gradients and metrics of the SFT loss (next-token NLL on the answer tokens, batch['mask'];
    prompt tokens masked out), accumulated over spec.micro_batches by token share. ``key``: the
    update's adapter-dropout key (dropout_key), or None."""

    def loss_fn(trainable, mb, mb_key):
        logp, _, _ = _model_forward(layout.graphdef, model_params(trainable["model"], base), mb, spec,
                                    layout.compute_dtype, dropout_key=mb_key)
        mask = mb["mask"].astype(jnp.float32)
        n = jnp.maximum(mask.sum(), 1.0)
        nll = -(logp * mask).sum() / n
        return nll, {"sft/nll": nll, "sft/tokens": mask.sum()}

    vg = jax.value_and_grad(loss_fn, has_aux=True)
    m = spec.micro_batches
    if m == 1:
        (_, metrics), grads = vg(params, batch, _micro_key(key, 0))
        return grads, metrics
    shares = rl.token_shares(batch["mask"], m)
    grads, per = _accumulate(vg, params, batch, shares, key)
    return grads, rl.combine_micro_metrics(per, shares, shares)


def rl_grads(params, batch, *, layout: StateLayout, spec: LearnerSpec, loss: rl.RLLoss, base=None, key=None):
    """Gradients and metrics of the RL loss on a batch with its advantages, accumulated over
    spec.micro_batches: each micro-batch weighs by its share of the loss's normalizer, counted on
    the mask the loss uses (after rl.overlong_filter), so the gradient is the whole batch's for
    every aggregation; metrics are combined as their names say, batch statistics (advantages,
    engine/trainer mismatch) taken on the whole batch. ``key``: the update's adapter-dropout key
    (dropout_key), or None; it drops out the current policy's forward only (the proximal and
    reference log-probs in the batch were computed without it)."""

    def loss_fn(trainable, mb, mb_key):
        logp, ent, values = _model_forward(layout.graphdef, model_params(trainable["model"], base), mb, spec,
                                           layout.compute_dtype,
                                           layout.value_graphdef, trainable.get("value"),
                                           return_entropy=spec.compute_entropy, dropout_key=mb_key)
        return loss(logp, mb, values=values, entropy=ent)

    vg = jax.value_and_grad(loss_fn, has_aux=True)
    m = spec.micro_batches
    if m == 1:
        (_, metrics), grads = vg(params, batch, _micro_key(key, 0))
        return grads, metrics
    loss_shares, token_shares = loss.micro_batch_shares(batch, m)
    grads, per = _accumulate(vg, params, batch, loss_shares, key)
    metrics = rl.combine_micro_metrics(per, loss_shares, token_shares, loss.TOKEN_MEANS)
    return grads, {**metrics, **loss.batch_metrics(batch)}


def _apply(state, grads, optimizer, count_step=1):
    """One optimizer update; ``state['step']`` counts trainer steps (a batch's last update
    counts it: ``count_step`` is 0 for the others)."""
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + count_step}


def sft_step(state, batch, *, layout: StateLayout, optimizer, spec: LearnerSpec):
    """One SFT update (sft_grads)."""
    key = dropout_key(layout, SFT_PHASE, state["step"])
    grads, metrics = sft_grads(state["params"], batch, layout=layout, spec=spec, base=state.get("base"), key=key)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return _apply(state, grads, optimizer), metrics


def rl_step(state, batch, *, layout: StateLayout, optimizer, spec: LearnerSpec, loss: rl.RLLoss):
    """One optimizer update on a (mini-)batch whose advantages are already in it (computed on the
    whole admitted batch: rl.with_advantages), the loss accumulated over micro-batches (rl_grads).
    A batch key 'count_step' (a replicated int32: 1 for a batch's last update) says whether it
    completes a trainer step; without it, it does. A key 'update_index' (the update's number
    within its trainer step; 0 without it) tells the updates' dropout masks apart."""
    batch = dict(batch)
    count_step = batch.pop("count_step", 1)
    key = dropout_key(layout, RL_PHASE, state["step"], batch.pop("update_index", 0))
    grads, metrics = rl_grads(state["params"], batch, layout=layout, spec=spec, loss=loss, base=state.get("base"),
                              key=key)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["reward_shaped_mean"] = jnp.mean(batch["shaped_rewards"])
    return _apply(state, grads, optimizer, count_step), metrics


def ref_logprobs(ref_params, batch, base=None, *, layout: StateLayout, spec: LearnerSpec):
    """The frozen reference policy's log-probs (for the KL term); the model alone, no value head.
    With LoRA the reference is the frozen base itself: ``ref_params`` are zero adapters (B = 0
    adds exactly nothing), so no second copy of the weights exists."""
    return _model_forward(layout.graphdef, model_params(ref_params, base), batch, spec, layout.compute_dtype,
                          parts=spec.micro_batches)[0]


def recompute(params, batch, base=None, *, layout: StateLayout, spec: LearnerSpec):
    """The proximal ("old") policy's log-probs (and values) of a batch, without gradients."""
    logp, _, values = _model_forward(layout.graphdef, model_params(params["model"], base), batch, spec,
                                     layout.compute_dtype, layout.value_graphdef, params.get("value"),
                                     parts=spec.micro_batches)
    return logp, values


def prepare(params, ref_params, batch, base=None, *, layout: StateLayout, spec: LearnerSpec, settings):
    """Everything a batch needs before its updates, in one call: the proximal log-probs (and
    old values), the reference's log-probs when there is one, then the advantages."""
    batch = dict(batch)
    batch["proximal_logp"], values = recompute(params, batch, layout=layout, spec=spec, base=base)
    if values is not None:
        batch["old_values"] = values
    if ref_params is not None:
        batch["ref_logp"] = ref_logprobs(ref_params, batch, layout=layout, spec=spec, base=base)
    return rl.with_advantages(settings, batch)


# Per-update metrics combined over a batch's updates: the extreme for *_max / *_min, else the mean.
def combine_metrics(per_update: list[dict]) -> dict:
    out = {}
    for k in per_update[0]:
        vals = np.asarray([float(m[k]) for m in per_update])
        out[k] = float(vals.max() if k.endswith("_max") else vals.min() if k.endswith("_min") else vals.mean())
    out["updates"] = len(per_update)
    return out


def mini_batch_groups(num_groups: int, spec: LearnerSpec, seed: int) -> list[np.ndarray]:
    """The groups of each update, in order: every epoch covers every group once, split into
    spec.mini_batches equal parts; the first epoch in batch order, later ones in a seeded
    permutation (so an update does not always pair the same groups)."""
    per = num_groups // spec.mini_batches
    out = []
    for epoch in range(spec.ppo_epochs):
        order = np.arange(num_groups) if epoch == 0 else np.random.default_rng([seed, epoch]).permutation(num_groups)
        out += [np.sort(order[i * per:(i + 1) * per]) for i in range(spec.mini_batches)]
    return out


def group_rows(groups: np.ndarray, group_size: int) -> np.ndarray:
    """The sample rows of ``groups`` (contiguous rows of group_size each), in order."""
    return (groups[:, None] * group_size + np.arange(group_size)[None, :]).ravel().astype(np.int32)


def _take_rows(batch: dict, rows: jax.Array) -> dict:
    return {k: jnp.take(v, rows, axis=0) for k, v in batch.items()}


class Learner:
    """Owns the compiled steps for one mesh, layout and optimizer."""

    def __init__(self, mesh: jax.sharding.Mesh, layout: StateLayout, optimizer: optax.GradientTransformation,
                 spec: LearnerSpec, loss: rl.RLLoss | None):
        self.mesh, self.layout, self.spec = mesh, layout, spec
        self.batch_sharding = sharding.batch_sharding(mesh, 2)
        self.row_sharding = sharding.batch_sharding(mesh, 1)
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state_sh = layout.shardings
        base_sh = state_sh.get("base")
        # Traced under the mesh: the attention kernels run under shard_map over it (kernels.sharded).
        jit = lambda *a, **k: kernels.under_mesh(mesh, jax.jit(*a, **k))  # noqa: E731
        self._sft = jit(functools.partial(sft_step, layout=layout, optimizer=optimizer, spec=spec),
                        in_shardings=(state_sh, None), out_shardings=(state_sh, None), donate_argnums=(0,))
        self._rl = self._advantages = None
        self.group_size = None if loss is None else loss.settings.group_size
        if loss is not None:
            self._advantages = jax.jit(functools.partial(rl.with_advantages, loss.settings))
            self._prepare = {with_ref: jit(functools.partial(prepare, layout=layout, spec=spec,
                                                             settings=loss.settings),
                                           in_shardings=(state_sh["params"],
                                                         state_sh["params"]["model"] if with_ref else None, None,
                                                         base_sh))
                             for with_ref in (False, True)}
            self._rl = jit(functools.partial(rl_step, layout=layout, optimizer=optimizer, spec=spec, loss=loss),
                           in_shardings=(state_sh, None), out_shardings=(state_sh, None), donate_argnums=(0,))
        self.row_multiple = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        self._take = jax.jit(_take_rows)
        self._recompute = jit(functools.partial(recompute, layout=layout, spec=spec),
                              in_shardings=(state_sh["params"], None, base_sh))
        self._ref = jit(functools.partial(ref_logprobs, layout=layout, spec=spec),
                        in_shardings=(state_sh["params"]["model"], None, base_sh))

    def pack(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A per-sample host batch with its model inputs packed for this learner's steps."""
        return batching.pack(host, self.spec.pack_len, self.spec.micro_batches, self.row_multiple)

    def _shardings(self, tree):
        return jax.tree.map(lambda v: self.batch_sharding if np.ndim(v) == 2 else
                            self.row_sharding if np.ndim(v) == 1 else self.replicated, tree)

    def place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Packs a per-sample host batch and puts it on the mesh: rows over ('data', 'fsdp')."""
        packed = self.pack(batch)
        return jax.device_put(packed, self._shardings(packed))

    def sft_step(self, state, batch):
        with jax.transfer_guard("disallow"):
            return self._sft(state, batch)

    def rl_step(self, state, batch):
        with jax.transfer_guard("disallow"):
            return self._rl(state, batch)

    def with_advantages(self, batch):
        """Advantages (and returns, shaped rewards) on the whole placed batch."""
        with jax.transfer_guard("disallow"):
            return self._advantages(batch)

    def prepare(self, params, batch, ref=None, base=None):
        """The placed batch with its proximal log-probs (old values), reference log-probs (when
        ``ref``, the frozen reference's model params, is given) and advantages: one jitted call.
        ``base``: the frozen base weights of a LoRA policy (``params['model']`` are adapters)."""
        with jax.transfer_guard("disallow"):
            return self._prepare[ref is not None](params, ref, batch, base)

    def rl_update(self, state, batch, *, seed: int, host: dict[str, np.ndarray] | None = None):
        """All of a batch's optimizer updates (spec.ppo_epochs x spec.mini_batches), the
        proximal log-probs in ``batch`` fixed before the first; returns (state, host metrics
        combined over the updates). ``batch`` is placed and has its advantages; ``host`` is the
        per-sample host batch it was placed from (needed with several updates).

        Mini-batches never leave the device: their per-sample rows are selected on the mesh,
        and their packed model inputs (each mini-batch packs its own samples) are built on the
        host from ``host`` and placed, all of them in one transfer, before the first update."""
        if self.spec.updates_per_batch == 1:
            state, m = self.rl_step(state, batch)
            return state, {**to_host(m), "updates": 1}
        if host is None:
            raise ValueError("rl_update with several updates per batch needs the host batch (host=)")
        per_sample = {k: v for k, v in batch.items() if k not in batching.MODEL_KEYS + ("pack_index",)}
        plan = mini_batch_groups(host["rewards"].shape[0] // self.group_size, self.spec, seed)
        inputs = {k: host[k] for k in batching.MODEL_KEYS}
        minis = []
        for i, groups in enumerate(plan):
            rows = group_rows(groups, self.group_size)
            mini = self.pack({k: v[rows] for k, v in inputs.items()})
            mini.update(rows=rows, count_step=np.int32(i == len(plan) - 1), update_index=np.int32(i),
                        group_ids=np.repeat(np.arange(len(groups), dtype=np.int32), self.group_size))
            minis.append(mini)
        minis = jax.device_put(minis, self._shardings(minis))
        per_update = []
        for mini in minis:
            with jax.transfer_guard("disallow"):
                selected = self._take(per_sample, mini.pop("rows"))
            state, m = self.rl_step(state, {**selected, **mini})
            per_update.append(m)
        return state, combine_metrics(to_host(per_update))

    def recompute(self, params, batch, base=None):
        with jax.transfer_guard("disallow"):
            return self._recompute(params, batch, base)

    def ref_logprobs(self, model_params, batch, base=None):
        with jax.transfer_guard("disallow"):
            return self._ref(model_params, batch, base)


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
