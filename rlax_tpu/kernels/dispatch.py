"""The one dispatcher between the Pallas kernels and their jnp references.

``impl='auto'`` runs the Pallas kernels on TPU/GPU and the jnp reference on CPU; ``'pallas'``
forces the kernels (interpret mode on CPU); ``'reference'`` forces jnp. Inputs a path does not
support raise KernelError naming what is unsupported: nothing falls back silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlax_tpu.kernels import reference
from rlax_tpu.kernels.decode_attention import decode_attention_pallas
from rlax_tpu.kernels.flash_attention import flash_attention_pallas

IMPLS = ("auto", "pallas", "reference")
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


class KernelError(ValueError):
    """An attention call the chosen implementation does not support."""


def resolve_impl(impl: str) -> str:
    """The path ``impl`` takes on this backend: 'pallas' or 'reference'."""
    return _resolve(impl)


def _resolve(impl: str) -> str:
    if impl not in IMPLS:
        raise KernelError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return "reference" if jax.default_backend() == "cpu" else "pallas"
    return impl


def _interpret(interpret: bool | None) -> bool:
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check_heads(where: str, hq: int, hkv: int) -> None:
    if hkv == 0 or hq % hkv:
        raise KernelError(f"{where}: query heads {hq} must be a multiple of kv heads {hkv} (GQA)")


def _check_kernel_inputs(where: str, arrays: dict, head_dim: int, blocks: dict) -> None:
    """What the Pallas kernels (not the references) support."""
    for name, x in arrays.items():
        if jnp.dtype(x.dtype) not in KERNEL_DTYPES:
            raise KernelError(f"{where}: {name} dtype {jnp.dtype(x.dtype).name} is unsupported by the "
                              "Pallas kernel (float32 or bfloat16); use impl='reference'")
    dtypes = {jnp.dtype(x.dtype).name for x in arrays.values()}
    if len(dtypes) > 1:
        raise KernelError(f"{where}: mixed input dtypes {sorted(dtypes)}; the kernel needs one dtype")
    if not (_is_pow2(head_dim) and MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM):
        raise KernelError(f"{where}: head_dim {head_dim} is unsupported by the Pallas kernel "
                          f"(a power of two in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}])")
    for name, size in blocks.items():
        if not (_is_pow2(size) and size >= 16):
            raise KernelError(f"{where}: {name}={size} must be a power of two >= 16")


def flash_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=True, scale=None,
                    impl: str = "auto", block_q: int = 128, block_k: int = 128,
                    heads_per_program: int | None = None, interpret: bool | None = None):
    """Prefill / training attention. See reference.flash_attention_reference for layouts.

    block_q / block_k: Pallas tile sizes (clamped to the padded sequence lengths).
    heads_per_program: q heads per Pallas program (default 1; more on TPU when head_dim < 128).
    interpret: Pallas interpret mode; default True on CPU, False elsewhere.
    """
    where = "flash_attention"
    path = _resolve(impl)
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise KernelError(f"{where}: want q [B,T,Hq,D] and k, v [B,S,Hkv,D] of equal shape; got "
                          f"q {q.shape}, k {k.shape}, v {v.shape}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise KernelError(f"{where}: q {q.shape} and k {k.shape} differ in batch or head_dim")
    _check_heads(where, hq, k.shape[2])
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise KernelError(f"{where}: pass both q_segment_ids and kv_segment_ids or neither")
    if q_segment_ids is not None:
        if q_segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, k.shape[1]):
            raise KernelError(f"{where}: segment ids must be [B,T]={b, t} and [B,S]={b, k.shape[1]}; got "
                              f"{q_segment_ids.shape} and {kv_segment_ids.shape}")
        for name, x in (("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise KernelError(f"{where}: {name} must be integers, got {jnp.dtype(x.dtype).name}")
    if path == "reference":
        return reference.flash_attention_reference(
            q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
            scale=scale)
    interp = _interpret(interpret)
    _check_kernel_inputs(where, {"q": q, "k": k, "v": v}, d, {"block_q": block_q, "block_k": block_k})
    hp, g = heads_per_program, hq // k.shape[2]
    if hp is not None and (hp < 1 or hq % hp or (g % hp and hp % g) or (hp > g and k.shape[2] % (hp // g))):
        raise KernelError(f"{where}: heads_per_program={hp} must divide Hq={hq} and divide "
                          f"or be a multiple of the group size {g} (whole groups dividing Hkv)")
    return flash_attention_pallas(
        q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal, scale=scale,
        block_q=block_q, block_k=block_k, heads_per_program=heads_per_program, interpret=interp)


def decode_attention(q, k_cache, v_cache, lengths, *, scale=None, impl: str = "auto", block_k: int = 128,
                     kv_heads_per_program: int | None = None, interpret: bool | None = None):
    """Single-token decode attention over a KV cache with per-sequence lengths.

    block_k: KV tile size of the Pallas kernel (clamped to S). kv_heads_per_program: kv heads per
    Pallas program (default 1; more on TPU when head_dim < 128). interpret: as flash_attention.
    """
    where = "decode_attention"
    path = _resolve(impl)
    if q.ndim != 3 or k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise KernelError(f"{where}: want q [B,Hq,D] and k_cache, v_cache [B,Hkv,S,D] of equal shape; "
                          f"got q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}")
    b, hq, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise KernelError(f"{where}: q {q.shape} and k_cache {k_cache.shape} differ in batch or head_dim")
    _check_heads(where, hq, k_cache.shape[1])
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise KernelError(f"{where}: lengths must be integer [B]={b,}; got {lengths.dtype} {lengths.shape}")
    if path == "reference":
        return reference.decode_attention_reference(q, k_cache, v_cache, lengths, scale=scale)
    interp = _interpret(interpret)
    _check_kernel_inputs(where, {"q": q, "k_cache": k_cache, "v_cache": v_cache}, d, {"block_k": block_k})
    if kv_heads_per_program is not None and (kv_heads_per_program < 1
                                             or k_cache.shape[1] % kv_heads_per_program):
        raise KernelError(f"{where}: kv_heads_per_program={kv_heads_per_program} must divide "
                          f"Hkv={k_cache.shape[1]}")
    if k_cache.shape[2] == 0:
        raise KernelError(f"{where}: empty cache (S = 0) is unsupported by the Pallas kernel")
    if k_cache.shape[2] < 16 and not interp:
        raise KernelError(f"{where}: cache length {k_cache.shape[2]} < 16 is unsupported by the compiled "
                          "kernel (KV tiles are powers of two >= 16)")
    return decode_attention_pallas(q, k_cache, v_cache, lengths, scale=scale, block_k=block_k,
                                   kv_heads_per_program=kv_heads_per_program, interpret=interp)
