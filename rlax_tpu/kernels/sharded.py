"""The public attention entry points: each Pallas call runs under ``jax.shard_map``.

``pallas_call`` has no GSPMD partitioning rule: on GSPMD-sharded operands XLA would gather them
onto every device first. These wrappers take the mesh the caller traces under (``jax.set_mesh``;
see ``under_mesh``) and run the dispatcher per shard: batch over ('data', 'fsdp'), heads over
'tensor', and KV pages with their heads (a page pool is split on its kv-head axis). A pool's page
axis is whole by default (any row may point at any page); with ``split_pages`` it is split with
the batch, each batch shard's rows pointing only at its own block of pages (the engine's layout:
then the write of new K/V into pages, ``write_pages`` / ``copy_pages``, stays on its shard too).
A dimension a mesh axis does not divide is left whole (correct, with the gather that implies).
Without a mesh, with the jnp reference path on whole pools (GSPMD partitions plain jnp itself) or
inside a shard_map that already owns those axes, the dispatcher is called directly. Arguments
and results are the dispatcher's (dispatch.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from math import prod

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from rlax_tpu.kernels import dispatch

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def under_mesh(mesh: jax.sharding.Mesh | None, fn: Callable) -> Callable:
    """``fn`` called (so traced) under ``jax.set_mesh(mesh)``, which is where these wrappers find
    the mesh; ``fn`` itself when there is no mesh."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def _free_axes(mesh, names) -> tuple[str, ...]:
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    return tuple(a for a in names if a in types and mesh.shape[a] > 1 and types[a] != AxisType.Manual)


def _split(mesh, names, size: int):
    """The mesh axes (a prefix of ``names`` still free) whose product divides ``size``."""
    axes = _free_axes(mesh, names)
    while axes and size % prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _plan(batch: int, hq: int, hkv: int):
    """(mesh, batch axes, head axis) for the current context, or None to call directly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    b = _split(mesh, BATCH_AXES, batch)
    h = _split(mesh, (HEAD_AXIS,), hkv) if hq % hkv == 0 else None  # kv heads divide -> q heads do
    return None if b is None and h is None else (mesh, b, h)


def _run(fn, plan, in_specs, out_spec, *args):
    mesh = plan[0]
    # check_vma=False: pallas_call has no replication rule; every output is split like its specs.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


def flash_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=True, scale=None,
                    impl: str = "auto", **kernel_kw):
    """dispatch.flash_attention (q [B,T,Hq,D]; k, v [B,S,Hkv,D]; segment ids [B,T] / [B,S])."""
    call = functools.partial(dispatch.flash_attention, causal=causal, scale=scale, impl=impl, **kernel_kw)
    plan = None if dispatch.resolve_impl(impl) == "reference" or q.ndim != 4 or k.ndim != 4 else \
        _plan(q.shape[0], q.shape[2], k.shape[2])
    if plan is None:
        return call(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    _, b, h = plan
    x = P(b, None, h, None)
    if q_segment_ids is None:
        return _run(lambda q, k, v: call(q, k, v), plan, (x, x, x), x, q, k, v)
    seg = P(b, None)
    return _run(lambda q, k, v, qs, ks: call(q, k, v, q_segment_ids=qs, kv_segment_ids=ks), plan,
                (x, x, x, seg, seg), x, q, k, v, q_segment_ids, kv_segment_ids)


def decode_attention(q, k_cache, v_cache, lengths, *, scale=None, impl: str = "auto", **kernel_kw):
    """dispatch.decode_attention (q [B,Hq,D]; caches [B,Hkv,S,D]; lengths [B])."""
    call = functools.partial(dispatch.decode_attention, scale=scale, impl=impl, **kernel_kw)
    plan = None if dispatch.resolve_impl(impl) == "reference" or q.ndim != 3 or k_cache.ndim != 4 else \
        _plan(q.shape[0], q.shape[1], k_cache.shape[1])
    if plan is None:
        return call(q, k_cache, v_cache, lengths)
    _, b, h = plan
    return _run(call, plan, (P(b, h, None), P(b, h, None, None), P(b, h, None, None), P(b)), P(b, h, None),
                q, k_cache, v_cache, lengths)


def _paged_plan(impl: str, batch: int, hq: int, hkv: int, split_pages: bool, pages: int):
    """The plan of a paged call. With ``split_pages`` the pool's page axis is split over every
    free batch axis (each batch shard's rows point only at pages of its own block; ids stay
    global): the rows must divide over those axes, and even the jnp reference runs per shard (on
    the global pool GSPMD would gather pages to follow global ids)."""
    if not split_pages:
        return None if dispatch.resolve_impl(impl) == "reference" else _plan(batch, hq, hkv)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes = _free_axes(mesh, BATCH_AXES)
    shards = prod(mesh.shape[a] for a in axes)
    if batch % shards or pages % shards:
        raise dispatch.KernelError(f"{batch} rows and {pages} pool pages must divide over the batch axes {axes} "
                                   f"({shards} shards) that split the page pool")
    b = None if not axes else (axes[0] if len(axes) == 1 else axes)
    h = _split(mesh, (HEAD_AXIS,), hkv) if hq % hkv == 0 else None
    return None if b is None and h is None else (mesh, b, h)


def _pool_spec(plan, split_pages: bool) -> P:
    _, b, h = plan
    return P(h, b if split_pages else None, None, None)


def _local(ids, pool):
    """Global page ids -> ids in this shard's block of the pool: a block's pages map to their
    place in it, and 0 (the null page) to the block's own null page."""
    return ids % pool.shape[1]


def paged_decode_attention(q, k_pages, v_pages, lengths, page_indices, *, scale=None, impl: str = "auto",
                           split_pages: bool = False, **kernel_kw):
    """dispatch.paged_decode_attention (q [B,Hq,D]; pools [Hkv,P,ps,D]; lengths [B]; tables [B,n]).
    ``split_pages``: the pools' page axis is split with the batch (see ``_paged_plan``)."""
    call = functools.partial(dispatch.paged_decode_attention, scale=scale, impl=impl, **kernel_kw)
    plan = None if q.ndim != 3 or k_pages.ndim != 4 else \
        _paged_plan(impl, q.shape[0], q.shape[1], k_pages.shape[0], split_pages, k_pages.shape[1])
    if plan is None:
        return call(q, k_pages, v_pages, lengths, page_indices)
    _, b, h = plan
    pool = _pool_spec(plan, split_pages)
    local = (lambda q, kp, vp, n, t: call(q, kp, vp, n, _local(t, kp))) if split_pages else call
    return _run(local, plan, (P(b, h, None), pool, pool, P(b), P(b, None)), P(b, h, None),
                q, k_pages, v_pages, lengths, page_indices)


def paged_prefill_attention(q, k_pages, v_pages, q_start, q_lens, kv_lens, page_indices, *, scale=None,
                            impl: str = "auto", split_pages: bool = False, **kernel_kw):
    """dispatch.paged_prefill_attention (q [B,T,Hq,D]; pools [Hkv,P,ps,D]; rows [B]; tables [B,n]).
    ``split_pages``: as for paged_decode_attention."""
    call = functools.partial(dispatch.paged_prefill_attention, scale=scale, impl=impl, **kernel_kw)
    plan = None if q.ndim != 4 or k_pages.ndim != 4 else \
        _paged_plan(impl, q.shape[0], q.shape[2], k_pages.shape[0], split_pages, k_pages.shape[1])
    if plan is None:
        return call(q, k_pages, v_pages, q_start, q_lens, kv_lens, page_indices)
    _, b, h = plan
    pool, row = _pool_spec(plan, split_pages), P(b)
    local = (lambda q, kp, vp, s, n, kv, t: call(q, kp, vp, s, n, kv, _local(t, kp))) if split_pages else call
    return _run(local, plan, (P(b, None, h, None), pool, pool, row, row, row, P(b, None)),
                P(b, None, h, None), q, k_pages, v_pages, q_start, q_lens, kv_lens, page_indices)


def _scatter(k_pages, v_pages, pages, offsets, k, v):
    lead = tuple(range(k.ndim - 2))
    perm = (k.ndim - 2, *lead, k.ndim - 1)  # [..., Hkv, D] -> [Hkv, ..., D]
    return (k_pages.at[:, pages, offsets].set(k.transpose(perm).astype(k_pages.dtype)),
            v_pages.at[:, pages, offsets].set(v.transpose(perm).astype(v_pages.dtype)))


def write_pages(k_pages, v_pages, pages, offsets, k, v):
    """New K/V [B, ..., Hkv, D] written at pool (pages, offsets) [B, ...] of pools
    [Hkv, P, ps, D] laid out as ``split_pages`` describes (global page ids; each row's pages in
    its batch shard's block); returns the two pools. Under a mesh the write runs per shard with
    the pools' heads, so neither the new K/V nor the pages move between devices."""
    hkv = k_pages.shape[0]
    plan = _paged_plan("reference", k.shape[0], hkv, hkv, True, k_pages.shape[1])
    if plan is None:
        return _scatter(k_pages, v_pages, pages, offsets, k, v)
    _, b, h = plan
    lead = (None,) * (k.ndim - 3)
    pool, idx, new = _pool_spec(plan, True), P(b, *lead), P(b, *lead, h, None)
    body = lambda kp, vp, pg, off, k, v: _scatter(kp, vp, _local(pg, kp), off, k, v)
    return _run(body, plan, (pool, pool, idx, idx, new, new), (pool, pool), k_pages, v_pages, pages, offsets, k, v)


def copy_pages(pools: tuple, src, dst) -> tuple:
    """Each pool [Hkv, P, ps, D] (laid out as ``split_pages`` describes) with page ``dst[i]`` set
    to page ``src[i]`` (global ids, [C]). Under a mesh, C divides over the batch shards and entry
    block r names pages of shard r's block: each shard copies within its own pages."""
    def body(src, dst, *pools):
        src, dst = _local(src, pools[0]), _local(dst, pools[0])
        return tuple(p.at[:, dst].set(p[:, src]) for p in pools)

    hkv = pools[0].shape[0]
    plan = _paged_plan("reference", src.shape[0], hkv, hkv, True, pools[0].shape[1])
    if plan is None:
        return body(src, dst, *pools)
    _, b, _ = plan
    pool = _pool_spec(plan, True)
    return _run(body, plan, (P(b), P(b), *(pool,) * len(pools)), (pool,) * len(pools), src, dst, *pools)
