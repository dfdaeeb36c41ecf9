"""The decoder-only Transformer (Llama / Qwen2 / Qwen3) and its KV cache.

Masks come from segment ids (0 = padding; equal non-zero ids attend to each other, causally by
array index), so left padding, right padding and packed rows all work; positions are explicit
(restart them per packed segment). Activations run in ``cfg.dtype``; norms, softmax and logits
are f32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlax_tpu import kernels
from rlax_tpu.models.config import ModelConfig
from rlax_tpu.models.layers import Block, RMSNorm, param, rope_cos_sin
from rlax_tpu.models.logprobs import chunked_target_logprobs


class KVCache(NamedTuple):
    """Keys/values (RoPE applied) in the compute dtype: k and v are tuples with one array per
    layer, each [B, Hkv, S, D].

    One buffer per layer, so a decode step updates and reads each layer's cache in place (slicing
    a stacked [L, ...] array made XLA copy every layer's slab on every step). Head-major, so each
    (sequence, kv head) slab [S, D] is contiguous: the decode dots need no transpose of the cache,
    and on TPU the tiled dims are (S, D) rather than a small Hkv padded up to a tile.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.num_layers))
        return cls(zeros(), zeros())

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                 cfg.param_dtype)

    # -- helpers --------------------------------------------------------------------------
    def _embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.jnp_dtype)

    def output_weight(self) -> jax.Array:
        """[V, H] matrix of the output projection (the embedding when tied)."""
        return (self.embed if self.cfg.tie_embeddings else self.lm_head)[...]

    def _trunk(self, tokens, positions, segment_ids):
        tokens = jnp.asarray(tokens, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        cos, sin = rope_cos_sin(self.cfg, positions)
        x = self._embed(tokens)
        ks, vs = [], []
        for block in self.layers:
            if self.cfg.remat:
                x, (k, v) = nnx.remat(lambda b, *a: b(*a))(block, x, cos, sin, segment_ids)
            else:
                x, (k, v) = block(x, cos, sin, segment_ids)
            ks.append(k)
            vs.append(v)
        return self.norm(x), ks, vs

    # -- entry points ---------------------------------------------------------------------
    def hidden(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """Final-normed hidden states [B, T, H] in the compute dtype."""
        return self._trunk(tokens, positions, segment_ids)[0]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, ..., H] -> f32 logits [B, ..., V]."""
        w = self.output_weight().astype(hidden.dtype)
        return jnp.einsum("...h,vh->...v", hidden, w, preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        return self.logits(self.hidden(tokens, positions, segment_ids))

    def target_logprobs(self, tokens, targets, positions=None, segment_ids=None, *, chunk=None,
                        return_entropy=False):
        """log p(targets[b, t] | tokens[b, :t+1]) as f32 [B, T] (and the entropy [B, T]).

        Chunked over the vocabulary (``chunk`` or cfg.logprob_chunk): the full [B, T, V] logits
        never exist, in the forward or the backward pass.
        """
        h = self.hidden(tokens, positions, segment_ids)
        return chunked_target_logprobs(h, self.output_weight(), targets,
                                       chunk or self.cfg.logprob_chunk, return_entropy)

    def prefill(self, tokens, positions=None, segment_ids=None) -> tuple[jax.Array, KVCache]:
        """Hidden states [B, T, H] and the k/v of every position: KVCache with S = T."""
        h, ks, vs = self._trunk(tokens, positions, segment_ids)
        head_major = lambda xs: tuple(x.transpose(0, 2, 1, 3) for x in xs)  # [B, T, K, D] -> [B, K, T, D]
        return h, KVCache(head_major(ks), head_major(vs))

    def decode(self, tokens, positions, cache: KVCache, lengths) -> tuple[jax.Array, KVCache]:
        """One token per sequence: tokens, positions, lengths [B] -> (f32 logits [B, V], cache).

        Writes this token's k/v at cache index positions[b], then attends over the first
        lengths[b] cache entries (normally positions + 1).
        """
        cfg = self.cfg
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = jnp.asarray(positions, jnp.int32)
        b = tokens.shape[0]
        rows = jnp.arange(b)
        cos, sin = rope_cos_sin(cfg, positions[:, None])
        x = self._embed(tokens[:, None])  # [B, 1, H]
        ck, cv = list(cache.k), list(cache.v)
        for i, block in enumerate(self.layers):
            attn = block.attn
            q, k, v = attn.qkv(block.input_norm(x), cos, sin)
            # c[rows, :, positions] is [B, Hkv, D] (advanced indices first, then the slice).
            ck[i] = ck[i].at[rows, :, positions].set(k[:, 0].astype(ck[i].dtype))
            cv[i] = cv[i].at[rows, :, positions].set(v[:, 0].astype(cv[i].dtype))
            o = kernels.decode_attention(q[:, 0], ck[i], cv[i], lengths, scale=cfg.head_dim**-0.5,
                                         impl=cfg.attention_impl)
            x = x + attn.out(o[:, None].astype(x.dtype))
            x = x + block.mlp(block.post_norm(x))
        return self.logits(self.norm(x))[:, 0], KVCache(tuple(ck), tuple(cv))
