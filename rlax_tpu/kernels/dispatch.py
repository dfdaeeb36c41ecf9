"""The one dispatcher between the Pallas kernels and their jnp references."""

from __future__ import annotations

import jax

from rlax_tpu.kernels import reference

IMPLS = ("auto", "pallas", "reference")


class KernelError(ValueError):
    """An attention call the chosen implementation does not support."""


def _resolve(impl: str) -> str:
    if impl not in IMPLS:
        raise KernelError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return "reference" if jax.default_backend() == "cpu" else "pallas"
    return impl


def flash_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=True, scale=None,
                    impl: str = "auto"):
    """Prefill / training attention. See reference.flash_attention_reference for layouts."""
    if _resolve(impl) == "reference":
        return reference.flash_attention_reference(
            q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
            scale=scale)
    raise KernelError("Pallas flash attention is not built yet")


def decode_attention(q, k_cache, v_cache, lengths, *, scale=None, impl: str = "auto"):
    """Single-token decode attention over a KV cache with per-sequence lengths."""
    if _resolve(impl) == "reference":
        return reference.decode_attention_reference(q, k_cache, v_cache, lengths, scale=scale)
    raise KernelError("Pallas decode attention is not built yet")
