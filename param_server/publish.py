"""The publish path: snapshot to host, write chunks, manifest, then CAS of LATEST.

A version becomes visible only through the compare-and-swap of ``params/LATEST``, which happens
after every chunk and the manifest are durable; a publisher killed at any earlier point leaves
LATEST at the previous version (readers only ever see complete versions). On several hosts every process writes
only the replica-0 chunks of its addressable shards, then a ``_done/p<i>`` marker; process 0
waits for all markers, writes the manifest and commits, the others wait for the commit.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from param_server import delta, faults, layout, reconstruct, tensor_io
from param_server.errors import FencedError, PublishConflictError, PublishError
from rlax_tpu import fencing


@dataclasses.dataclass
class LeafSnapshot:
    name: str
    shape: tuple[int, ...]
    dtype: str  # stored dtype
    source_dtype: str
    chunks: list[int]
    pieces: list[tuple[tuple, np.ndarray]]  # (global index, host data) this process writes


@dataclasses.dataclass
class Snapshot:
    step: int
    leaves: list[LeafSnapshot]
    process_index: int
    process_count: int
    # Caller's facts recorded in the manifest's "meta" (an adapter names its base's content hash).
    meta: dict = dataclasses.field(default_factory=dict)
    canary: dict | None = None  # the policy-landed check's figures (rlax_tpu/canary.py), in the manifest


def _stored_dtype(src: np.dtype, publish_dtype: str) -> np.dtype:
    return jnp.dtype(publish_dtype) if jnp.issubdtype(src, jnp.floating) else src


def snapshot(params: Any, step: int, publish_dtype: str, chunk_bytes: int) -> Snapshot:
    """Casts on device and copies this host's replica-0 shards to host memory."""
    named, _ = layout.flatten(params)
    if not named:
        raise PublishError("publish of an empty tree")
    pid, nproc = jax.process_index(), jax.process_count()
    staged = []
    for name, x in named:
        if isinstance(x, jax.Array):
            src = x.dtype
            dst = _stored_dtype(src, publish_dtype)
            if src != dst:
                x = x.astype(dst)  # on device, keeps the sharding; halves the copy for bf16
            shards = [s for s in x.addressable_shards if s.replica_id == 0]
            for s in shards:
                s.data.copy_to_host_async()
            shard_shape = tuple(x.sharding.shard_shape(x.shape))
            staged.append((name, x.shape, dst, src, shard_shape, shards))
        else:
            arr = np.asarray(x)
            dst = _stored_dtype(arr.dtype, publish_dtype)
            host = [((slice(None),) * arr.ndim, arr.astype(dst))] if pid == 0 else []
            staged.append((name, arr.shape, dst, arr.dtype, arr.shape, host))
    leaves = []
    for name, shape, dst, src, shard_shape, shards in staged:
        pieces = [s if isinstance(s, tuple) else (s.index, np.asarray(s.data)) for s in shards]
        chunks = layout.chunk_shape(shard_shape, np.dtype(dst).itemsize, chunk_bytes)
        leaves.append(LeafSnapshot(name, tuple(shape), str(np.dtype(dst)), str(np.dtype(src)),
                                   chunks, pieces))
    return Snapshot(int(step), leaves, pid, nproc)


@dataclasses.dataclass(frozen=True)
class Plan:
    version: int
    epoch: int

    @property
    def dirname(self) -> str:
        return layout.version_dir(self.version, self.epoch)


def _assemble(leaf: LeafSnapshot) -> np.ndarray:
    """The whole leaf on this (single) host, as a new array the trainer can never alias."""
    if len(leaf.pieces) == 1:
        data = leaf.pieces[0][1]
        if data.shape == leaf.shape and data.flags.owndata and data.flags.c_contiguous:
            return data  # the snapshot's own copy (a cast on the host), not a view of a device buffer
    out = np.empty(leaf.shape, np.dtype(leaf.dtype))
    for index, data in leaf.pieces:
        out[index] = data
    return out


def _plan_leaves(ps, snap: Snapshot, dirname: str):
    """Per leaf: its manifest entry and what to write. Returns (entries, writes, held arrays,
    manifest fields); without delta publishing every leaf is written in full, as before."""
    opts = ps.options
    entries, writes = {}, {}
    full = lambda leaf: {"kind": "full", "dir": dirname, "key": layout.array_key(leaf.name),  # noqa: E731
                         "chunks": leaf.chunks}
    if not (opts.delta and snap.process_count == 1):
        for leaf in snap.leaves:
            entries[leaf.name], writes[leaf.name] = full(leaf), ("full", None)
        return entries, writes, None, {"kind": "keyframe", "base": None, "chain": 0}
    held = ps.held_by_publisher
    if held is not None and ps.latest_version() != held.version:
        held = None  # another publisher moved LATEST: our copy is no base any more
    is_delta = held is not None and held.manifest.get("chain", 0) + 1 < opts.keyframe_every
    arrays = {}
    for leaf in snap.leaves:
        new = arrays[leaf.name] = _assemble(leaf)
        entry, write = full(leaf), ("full", None)
        old = held.arrays.get(leaf.name) if held is not None else None
        if old is not None and (old.shape != new.shape or old.dtype != new.dtype):
            old = None
        if old is not None:
            prev = held.manifest["leaves"][leaf.name]
            idx = delta.changed(new, old)
            if not idx.size and layout.entry_kind(prev) == "full":  # unchanged: name the old bytes
                entry = {**prev, "kind": "full", "dir": layout.entry_dir(prev, held.manifest)}
                write = ("none", None)
            elif not idx.size and is_delta:
                entry, write = {"kind": "same"}, ("none", None)
            elif is_delta and opts.delta_encoding == "xor":
                entry = {"kind": "xor", "dir": dirname, "key": layout.xor_key(leaf.name),
                         "bits_dtype": delta.bits_dtype(new.dtype), "chunks": leaf.chunks, "count": int(idx.size)}
                write = ("xor", delta.xor(new, old))
            elif is_delta:
                pos_kind, pos = delta.positions(idx, new.size)
                if delta.sparse_nbytes(pos_kind, idx.size, new) < new.nbytes:
                    payload = delta.encode_sparse(new, idx, pos)
                    entry = {"kind": "sparse", "dir": dirname, "key": layout.sparse_key(leaf.name),
                             "count": int(idx.size), "positions": pos_kind,
                             "payload_crc32c": delta.crc32c(np.frombuffer(payload, np.uint8))}
                    write = ("sparse", payload)
        if old is not None:  # how many elements changed, whatever the leaf's encoding
            entry = {**entry, "changed": int(idx.size)}
        entries[leaf.name] = {**entry, "crc32c": delta.crc32c(new)}
        writes[leaf.name] = write
    fields = ({"kind": "delta", "base": held.version, "chain": held.manifest.get("chain", 0) + 1}
              if is_delta else {"kind": "keyframe", "base": None, "chain": 0})
    return entries, writes, arrays, fields


def _issue_writes(ps, snap: Snapshot, base, leader: bool, writes: dict) -> list[list]:
    """Every write of the version in flight at once: zarr opens (metadata), then chunks."""
    opening = {}
    for leaf in snap.leaves:
        kind, data = writes[leaf.name]
        if kind == "full":
            spec = tensor_io.array_spec(leaf.shape, leaf.dtype, leaf.chunks, ps.options.compression)
            opening[leaf.name] = tensor_io.open_for_write(base / layout.array_key(leaf.name), spec,
                                                          ps.context, leader)
        elif kind == "xor":
            spec = tensor_io.array_spec(leaf.shape, str(data.dtype), leaf.chunks, "zstd")
            opening[leaf.name] = tensor_io.open_for_write(base / layout.xor_key(leaf.name), spec,
                                                          ps.context, leader)
    futures = []
    for leaf in snap.leaves:
        kind, data = writes[leaf.name]
        if kind == "full":
            futures.append(tensor_io.write_chunks(opening[leaf.name].result(), leaf.pieces))
        elif kind == "xor":
            futures.append([opening[leaf.name].result().write(data)])
        elif kind == "sparse":
            futures.append([base.write(layout.sparse_key(leaf.name), data)])
        else:
            futures.append([])
    return futures


def _written_bytes(leaf: LeafSnapshot, write: tuple) -> int:
    kind, data = write
    if kind == "full":
        return sum(d.nbytes for _, d in leaf.pieces)
    return 0 if data is None else len(data) if isinstance(data, bytes) else data.nbytes


def write_and_commit(ps, snap: Snapshot, plan: Plan) -> int:
    """Writes this host's chunks; process 0 then writes the manifest and commits. Returns version."""
    kv = ps.kv
    t0 = time.time()
    dirname = plan.dirname
    prefix = ps.keys.dir_prefix(dirname)
    leader = snap.process_index == 0
    try:
        if leader:
            kv.put(ps.keys.attempts + dirname, json.dumps({"started_at": t0, "step": snap.step}).encode())
        entries, writes, arrays, fields = _plan_leaves(ps, snap, dirname)
        futures = _issue_writes(ps, snap, ps.kv.sub(prefix), leader, writes)
        nbytes = chunks = 0
        for i, (leaf, futs) in enumerate(zip(snap.leaves, futures, strict=True)):
            for f in futs:
                f.result()
            chunks += len(futs)
            nbytes += _written_bytes(leaf, writes[leaf.name])
            faults.point("after_leaves", i + 1)
        faults.point("after_data")
        ps.last_publish_stats = {"version": plan.version, "pieces_written": chunks,
                                 "bytes_written": nbytes, "write_s": time.time() - t0, "kind": fields["kind"]}
        if snap.process_count > 1:
            kv.put(f"{prefix}_done/p{snap.process_index}", b"1")
        if not leader:
            _wait_for_commit(ps, plan)
            return plan.version
        if snap.process_count > 1:
            _wait_for_hosts(ps, plan, snap.process_count)
        body = {
            "format": layout.FORMAT, "version": plan.version, "epoch": plan.epoch, "step": snap.step,
            "dir": dirname, "created_at": time.time(), "process_count": snap.process_count,
            "publish_dtype": ps.options.publish_dtype, "compression": ps.options.compression,
            "total_bytes": sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in snap.leaves),
            "written_bytes": nbytes, **fields, "meta": snap.meta,
            **({"canary": snap.canary} if snap.canary else {}),
            "leaves": {
                leaf.name: {**entries[leaf.name], "shape": list(leaf.shape), "dtype": leaf.dtype,
                            "source_dtype": leaf.source_dtype}
                for leaf in snap.leaves
            },
        }
        kv.put(ps.keys.manifest_key(dirname), layout.encode_manifest(body))
        faults.point("after_manifest")
        _commit(ps, plan, body)
        if arrays is not None:
            ps.held_by_publisher = reconstruct.Held(plan.version, body, arrays)
        ps.last_publish_stats["total_s"] = time.time() - t0
        return plan.version
    except BaseException as e:
        if leader and snap.process_count > 1:
            try:
                kv.put(prefix + "_failed", str(e).encode())
            except Exception:  # the store itself may be what failed
                pass
        if isinstance(e, (PublishError, FencedError)):
            raise
        raise PublishError(
            f"publish of version {plan.version} (step {snap.step}) to {kv.url} failed: {e}") from e


def _commit(ps, plan: Plan, body: dict) -> None:
    kv = ps.kv
    record = {"version": plan.version, "dir": plan.dirname, "step": body["step"], "epoch": plan.epoch,
              "fence_epoch": plan.epoch, "total_bytes": body["total_bytes"]}
    for _ in range(20):
        entry = kv.read(ps.keys.latest)
        latest = ps.parse_latest(entry.value) if entry.exists else None
        if latest is not None:
            ps.ensure_committed_index(latest)
            if latest.get("fence_epoch", latest["epoch"]) > plan.epoch:
                raise FencedError(f"publish of version {plan.version}: trainer epoch {plan.epoch} is fenced "
                                  f"out by epoch {latest['fence_epoch']} in {kv.url}{ps.keys.latest}")
            if latest["version"] >= plan.version:
                raise PublishConflictError(
                    f"publish of version {plan.version}: LATEST in {kv.url} is already at version "
                    f"{latest['version']} (epoch {latest['epoch']}); another publisher committed first")
        fencing.check_epoch(kv, plan.epoch)
        faults.point("before_cas")
        record["committed_at"] = time.time()
        if kv.cas(ps.keys.latest, json.dumps(record).encode(), entry.generation):
            break
    else:
        raise PublishConflictError(f"publish of version {plan.version}: LATEST in {kv.url} keeps changing")
    faults.point("after_cas")
    kv.put(ps.keys.committed_key(plan.version), json.dumps(record).encode())


def _wait_for_hosts(ps, plan: Plan, nproc: int) -> None:
    prefix = ps.keys.dir_prefix(plan.dirname) + "_done/"
    deadline = time.time() + ps.options.commit_timeout_s
    while len(ps.kv.list(prefix)) < nproc:
        if time.time() > deadline:
            raise PublishError(f"publish of version {plan.version}: only {len(ps.kv.list(prefix))} of "
                               f"{nproc} processes wrote their shards within {ps.options.commit_timeout_s}s")
        time.sleep(0.05)


def _wait_for_commit(ps, plan: Plan) -> None:
    deadline = time.time() + ps.options.commit_timeout_s
    failed_key = ps.keys.dir_prefix(plan.dirname) + "_failed"
    while True:
        latest = ps.latest()
        if latest is not None and latest["version"] >= plan.version:
            if ps.committed_dir(plan.version) == plan.dirname:
                return
            raise PublishConflictError(f"publish of version {plan.version}: another publisher committed it")
        reason = ps.kv.get(failed_key)
        if reason is not None:
            raise PublishError(f"publish of version {plan.version} failed on process 0: {reason.decode()}")
        if time.time() > deadline:
            raise PublishError(f"publish of version {plan.version}: no commit by process 0 within "
                               f"{ps.options.commit_timeout_s}s")
        time.sleep(0.05)
