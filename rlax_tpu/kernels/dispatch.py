"""The one dispatcher between the Pallas kernels and their jnp references.

``impl='auto'`` runs the Pallas kernels on TPU/GPU and the jnp reference on CPU; ``'pallas'``
forces the kernels (interpret mode on CPU); ``'reference'`` forces jnp. Inputs a path does not
support raise KernelError naming what is unsupported: nothing falls back silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlax_tpu.kernels import paged_attention as paged
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


def _check_paged(where: str, q, k_pages, v_pages, page_indices, rows: dict) -> None:
    b, hq, d = q.shape[0], q.shape[-2], q.shape[-1]
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
        raise KernelError(f"{where}: want k_pages, v_pages [Hkv, num_pages, page_size, D] of equal shape; "
                          f"got {k_pages.shape} and {v_pages.shape}")
    if k_pages.shape[3] != d:
        raise KernelError(f"{where}: q head_dim {d} != k_pages head_dim {k_pages.shape[3]}")
    _check_heads(where, hq, k_pages.shape[0])
    if (page_indices.ndim != 2 or page_indices.shape[0] != b
            or not jnp.issubdtype(page_indices.dtype, jnp.integer)):
        raise KernelError(f"{where}: page_indices must be integer [B={b}, pages_per_seq]; got "
                          f"{page_indices.dtype} {page_indices.shape}")
    for name, x in rows.items():
        if x.shape != (b,) or not jnp.issubdtype(x.dtype, jnp.integer):
            raise KernelError(f"{where}: {name} must be integer [B]={b,}; got {x.dtype} {x.shape}")


def _check_paged_kernel(where: str, arrays: dict, head_dim: int, page_size: int, interp: bool) -> None:
    _check_kernel_inputs(where, arrays, head_dim, {})
    if not interp and not (_is_pow2(page_size) and page_size >= 16):
        raise KernelError(f"{where}: page_size {page_size} is unsupported by the compiled kernel "
                          "(a power of two >= 16)")


def _on_tpu() -> bool:
    """TPU kernels on TPU (and on CPU under pltpu.force_tpu_interpret_mode in tests)."""
    return jax.default_backend() == "tpu"


def paged_decode_attention(q, k_pages, v_pages, lengths, page_indices, *, scale=None, impl: str = "auto",
                           interpret: bool | None = None):
    """Single-token decode attention over a paged KV cache (layouts in reference.py).

    q [B, Hq, D]; k_pages, v_pages [Hkv, num_pages, page_size, D]; lengths [B] (valid positions,
    the current token's K/V already written; 0 gives zeros); page_indices [B, pages_per_seq].
    Pallas: JAX's GPU paged kernel on GPU and in interpret mode on CPU, ours on TPU.
    """
    where = "paged_decode_attention"
    path = _resolve(impl)
    if q.ndim != 3:
        raise KernelError(f"{where}: want q [B, Hq, D]; got {q.shape}")
    _check_paged(where, q, k_pages, v_pages, page_indices, {"lengths": lengths})
    if path == "reference":
        return reference.paged_decode_attention_reference(q, k_pages, v_pages, lengths, page_indices,
                                                          scale=scale)
    interp = _interpret(interpret)
    d = q.shape[-1]
    _check_paged_kernel(where, {"q": q, "k_pages": k_pages, "v_pages": v_pages}, d, k_pages.shape[2], interp)
    s = paged.default_scale(d, scale)
    if _on_tpu():
        q_start, q_lens, kv_lens = paged.decode_as_prefill(lengths)
        return paged.paged_attention_tpu(q[:, None], k_pages, v_pages, q_start, q_lens, kv_lens,
                                         page_indices, scale=s)[:, 0]
    return paged.paged_decode_shipped_gpu(q, k_pages, v_pages, lengths, page_indices, scale=s,
                                          interpret=interp)


def paged_prefill_attention(q, k_pages, v_pages, q_start, q_lens, kv_lens, page_indices, *, scale=None,
                            impl: str = "auto", block_q: int = 64, interpret: bool | None = None):
    """Queries of several tokens per sequence appended at an offset, over a paged KV cache.

    q [B, T, Hq, D]: row t of sequence b is at absolute position q_start[b] + t, live for
    t < q_lens[b]; it sees cache positions < kv_lens[b] up to its own (causal by absolute
    position; the new tokens' K/V written into the pages first). Decode is T = 1. Rows that are
    not live return zeros. block_q: query tokens per Pallas program (a power of two >= 1).
    """
    where = "paged_prefill_attention"
    path = _resolve(impl)
    if q.ndim != 4:
        raise KernelError(f"{where}: want q [B, T, Hq, D]; got {q.shape}")
    _check_paged(where, q, k_pages, v_pages, page_indices,
                 {"q_start": q_start, "q_lens": q_lens, "kv_lens": kv_lens})
    if path == "reference":
        return reference.paged_prefill_attention_reference(q, k_pages, v_pages, q_start, q_lens, kv_lens,
                                                           page_indices, scale=scale)
    interp = _interpret(interpret)
    d = q.shape[-1]
    _check_paged_kernel(where, {"q": q, "k_pages": k_pages, "v_pages": v_pages}, d, k_pages.shape[2], interp)
    if not _is_pow2(block_q):
        raise KernelError(f"{where}: block_q={block_q} must be a power of two")
    s = paged.default_scale(d, scale)
    if _on_tpu():
        return paged.paged_attention_tpu(q, k_pages, v_pages, q_start, q_lens, kv_lens, page_indices,
                                         scale=s, block_q=block_q)
    return paged.paged_attention_loop(q, k_pages, v_pages, q_start, q_lens, kv_lens, page_indices,
                                      scale=s, block_q=block_q, interpret=interp)
