"""The engine's device-side decode state: one row per slot, and the paged KV cache they share."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from inference_worker.engine import fast_model
from rlax_tpu.sharding import BATCH_AXES

MAX_STOP_IDS = 8  # stop token ids checked on device per slot; more are checked on the host


class DecodeState(NamedTuple):
    """Per-slot decode state. N = number of slots.

    A slot holds ``lengths`` tokens in the cache and ``tokens``, the last sampled token, which is
    fed (and written to the cache) by the next decode step. Which pool pages a slot's positions
    live in is the host's page table, passed to every call (it changes as pages are allocated).
    """

    cache: object  # fast_model.PagedCache: k, v pools per layer, each [Hkv, num_pages, page_size, D]
    tokens: jax.Array  # [N] int32
    lengths: jax.Array  # [N] int32, tokens already in the cache
    step: jax.Array  # [N] int32, tokens generated so far (also the RNG fold index)
    remaining: jax.Array  # [N] int32, decode steps still allowed (budget and cache capacity)
    active: jax.Array  # [N] bool
    keys: jax.Array  # [N, 2] uint32 per-completion base keys
    temperature: jax.Array  # [N] f32
    top_k: jax.Array  # [N] int32
    top_p: jax.Array  # [N] f32
    stop_ids: jax.Array  # [N, MAX_STOP_IDS] int32, -1 padded


def init_state(cache, num_slots: int) -> DecodeState:
    n = num_slots
    return DecodeState(
        cache=cache,
        tokens=jnp.zeros((n,), jnp.int32),
        lengths=jnp.zeros((n,), jnp.int32),
        step=jnp.zeros((n,), jnp.int32),
        remaining=jnp.zeros((n,), jnp.int32),
        active=jnp.zeros((n,), bool),
        keys=jnp.zeros((n, 2), jnp.uint32),
        temperature=jnp.ones((n,), jnp.float32),
        top_k=jnp.zeros((n,), jnp.int32),
        top_p=jnp.ones((n,), jnp.float32),
        stop_ids=jnp.full((n, MAX_STOP_IDS), -1, jnp.int32),
    )


def state_shardings(state: DecodeState, mesh: jax.sharding.Mesh | None, cfg):
    """Slots (dim 0 of every field but the cache) split over the mesh's batch axes (data
    parallelism, partitioned by XLA); the page pools over kv heads on 'tensor' and over the
    batch axes by blocks of pages, one per shard of the slots (fast_model.cache_shardings)."""
    if mesh is None:
        return None
    slots = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1) or None
    row = NamedSharding(mesh, PartitionSpec(slots))
    return state._replace(
        cache=fast_model.cache_shardings(cfg, state.cache, mesh),
        **{f: row for f in DecodeState._fields if f != "cache"},
    )
