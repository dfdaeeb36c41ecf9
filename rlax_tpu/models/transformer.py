"""The decoder-only Transformer (Llama / Qwen2 / Qwen3): the training forward and log-probs.

Generation has its own view of the same weights (inference_worker.engine.fast_model). Masks
come from segment ids (0 = padding; equal non-zero ids attend to each other, causally by array
index), so left padding, right padding and packed rows all work; positions are explicit (restart
them per packed segment). Activations run in ``cfg.dtype``; norms, softmax and logits are f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlax_tpu.models.config import ModelConfig
from rlax_tpu.models.layers import Block, RMSNorm, param, rope_cos_sin
from rlax_tpu.models.logprobs import chunked_target_logprobs
from rlax_tpu.models.lora import LoraSpec


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraSpec | None = None):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
        self.layers = nnx.List([Block(cfg, rngs, lora) for _ in range(cfg.num_layers)])
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

    # -- entry points ---------------------------------------------------------------------
    def hidden(self, tokens, positions=None, segment_ids=None, *, remat: bool = False,
               dropout_key: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states [B, T, H] in the compute dtype. ``remat``: recompute each
        layer's activations in the backward pass (less memory, about a third more compute).
        ``dropout_key``: drop out the LoRA adapters' inputs (LoraSpec.dropout; layer i's masks
        from fold_in(key, i)); None, the default, is every forward but training's gradient pass."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        cos, sin = rope_cos_sin(self.cfg, positions)
        x = self._embed(tokens)
        for i, block in enumerate(self.layers):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            if remat:  # the masks are a pure function of the key: the recompute draws the same
                x = nnx.remat(lambda b, *a: b(*a))(block, x, cos, sin, segment_ids, key)
            else:
                x = block(x, cos, sin, segment_ids, key)
        return self.norm(x)

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
