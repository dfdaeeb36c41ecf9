"""The engine's compiled functions: prefill into pages, start samples in slots, a multi-step decode loop.

They are plain functions of (weights, decode state, ...) so weights can be swapped without
recompiling (the weights are an argument, never a closure constant). The weights are the engine's
fused inference view (fast_model.InferenceWeights), built once per weight update. Decoding runs
up to ``num_steps`` tokens per call in a ``lax.while_loop`` on device: one host round trip per chunk, not
per token, which is what makes small-batch decode fast.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from inference_worker.engine import fast_model
from inference_worker.engine.sampling import derive_keys, sample
from inference_worker.engine.state import DecodeState
from rlax_tpu import kernels


def prefill(cfg, weights, state: DecodeState, tokens: jax.Array, q_start: jax.Array, q_lens: jax.Array,
            row_pages: jax.Array):
    """Prefills new tokens into the pages: tokens [B, T] right-padded, of each prefill row, at
    positions q_start + t (t < q_lens); row_pages: [B, W] the page table of each row's owner
    sequence. Returns (state, f32 logits [B, V] at each row's last new token)."""
    logits, cache = fast_model.prefill(cfg, weights, tokens, q_start, q_lens, row_pages, state.cache)
    return state._replace(cache=cache), logits


def start(
    cfg,
    state: DecodeState,
    logits: jax.Array,
    cow_src: jax.Array,
    cow_dst: jax.Array,
    src: jax.Array,
    dst: jax.Array,
    context_lens: jax.Array,
    budget: jax.Array,
    seed_lo: jax.Array,
    seed_hi: jax.Array,
    sample_index: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    stop_ids: jax.Array,
):
    """Starts prefilled requests' samples in decode slots with their first token, sharing each
    request's prefilled pages (the full ones by page table, the partly filled last one copied).

    logits: [B, V] of the prefill rows. cow_src, cow_dst: [C]
    pool pages to copy after the prefill (a group's partly filled last page, one copy per extra
    sample; padding copies the null page onto itself), in one block per shard of the slots
    (kernels.copy_pages). src: [K] prefill row of each new slot; dst:
    [K] its slot (== num_slots for padding, dropped). context_lens: [K] tokens in the cache once
    prefilled. budget: [K] tokens it may still generate after the first. seed_lo, seed_hi,
    sample_index: [K] uint32 seed words and sample index (each completion's RNG key is derived
    here, sampling.derive_keys). Returns (state, first tokens [K], their logp [K], raw logp [K]).
    """
    pools = kernels.copy_pages(state.cache.k + state.cache.v, cow_src, cow_dst)  # on each pages' shard
    layers = len(state.cache.k)
    cache = state.cache._replace(k=pools[:layers], v=pools[layers:])
    keys = derive_keys(seed_lo, seed_hi, sample_index)
    first, logp, raw_logp = sample(logits[src], keys, jnp.zeros_like(src), temperature, top_k, top_p)

    def setrow(arr, values):
        return arr.at[dst].set(values.astype(arr.dtype), mode="drop")

    state = state._replace(
        cache=cache,
        tokens=setrow(state.tokens, first),
        lengths=setrow(state.lengths, context_lens),
        step=setrow(state.step, jnp.ones_like(src)),
        remaining=setrow(state.remaining, budget),
        active=setrow(state.active, budget > 0),
        keys=setrow(state.keys, keys),
        temperature=setrow(state.temperature, temperature),
        top_k=setrow(state.top_k, top_k),
        top_p=setrow(state.top_p, top_p),
        stop_ids=setrow(state.stop_ids, stop_ids),
    )
    # A first token that is already a stop id ends the completion before any decode step.
    first_stops = jnp.any(stop_ids == first[:, None], axis=-1)
    state = state._replace(active=state.active.at[dst].min(~first_stops, mode="drop"))
    return state, first, logp, raw_logp


def decode(cfg, weights, state: DecodeState, keep: jax.Array, page_table: jax.Array, num_steps: int):
    """Runs up to ``num_steps`` decode steps for every active slot; stops early once no slot is
    active (so a long chunk costs nothing after the last sequence ends).

    keep: [N] bool; slots the host has released are deactivated first. page_table: [N, W] each
    slot's pages, covering every position the chunk writes (free slots: the null page).
    Returns (state, tokens [num_steps, N], logp, raw_logp, valid [num_steps, N], steps run);
    ``valid`` marks the tokens a slot really produced (it stops on a stop id or when its budget
    ends; steps not run are all invalid).
    """
    max_len = page_table.shape[1] * state.cache.page_size
    n = state.tokens.shape[0]
    state = state._replace(active=state.active & keep)
    outs = (jnp.zeros((num_steps, n), jnp.int32), jnp.zeros((num_steps, n), jnp.float32),
            jnp.zeros((num_steps, n), jnp.float32), jnp.zeros((num_steps, n), bool))

    def cond(carry):
        i, state, _ = carry
        return (i < num_steps) & jnp.any(state.active)

    def body(carry):
        i, state, outs = carry
        positions = jnp.minimum(state.lengths, max_len - 1)
        logits, cache = fast_model.decode_step(cfg, weights, state.tokens, positions, state.cache,
                                               page_table)
        tokens, logp, raw_logp = sample(
            logits, state.keys, state.step, state.temperature, state.top_k, state.top_p)
        act = state.active
        hit_stop = jnp.any(state.stop_ids == tokens[:, None], axis=-1)
        remaining = jnp.where(act, state.remaining - 1, state.remaining)
        new = state._replace(
            cache=cache,
            tokens=jnp.where(act, tokens, state.tokens),
            lengths=jnp.where(act, state.lengths + 1, state.lengths),
            step=jnp.where(act, state.step + 1, state.step),
            remaining=remaining,
            active=act & ~hit_stop & (remaining > 0),
        )
        outs = tuple(o.at[i].set(v) for o, v in zip(outs, (tokens, logp, raw_logp, act), strict=True))
        return i + 1, new, outs

    steps_run, state, outs = jax.lax.while_loop(cond, body, (jnp.int32(0), state, outs))
    return (state, *outs, steps_run)


def compile_steps(cfg, state_shardings, mesh: jax.sharding.Mesh | None = None, donate: bool = True):
    """jit-compiled prefill / start / decode for model config ``cfg`` (static); with a mesh, XLA
    partitions them from the state's shardings (slots over the batch axes, kv heads over 'tensor')
    and they are traced under it, so each attention kernel runs under shard_map over that mesh."""
    donate_state = (1,) if donate else ()
    out = (state_shardings, None, None, None) if state_shardings is not None else None
    # Prefill (the model, per batch and length bucket) and start (per slot count) compile apart,
    # so a new number of samples recompiles only the small start program.
    prefill_fn = jax.jit(functools.partial(prefill, cfg), donate_argnums=donate_state,
                         out_shardings=(state_shardings, None) if state_shardings is not None else None)
    start_fn = jax.jit(functools.partial(start, cfg), donate_argnums=(0,) if donate else (),
                       out_shardings=out)
    decode_fn = jax.jit(
        functools.partial(decode, cfg), static_argnames=("num_steps",), donate_argnums=donate_state,
        out_shardings=(state_shardings, None, None, None, None, None) if state_shardings is not None else None)
    return tuple(kernels.under_mesh(mesh, f) for f in (prefill_fn, start_fn, decode_fn))
