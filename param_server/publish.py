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

from param_server import faults, layout, tensor_io
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


def write_and_commit(ps, snap: Snapshot, plan: Plan) -> int:
    """Writes this host's chunks; process 0 then writes the manifest and commits. Returns version."""
    kv = ps.kv
    t0 = time.time()
    dirname = plan.dirname
    prefix = layout.dir_prefix(dirname)
    leader = snap.process_index == 0
    try:
        if leader:
            kv.put(layout.ATTEMPTS + dirname, json.dumps({"started_at": t0, "step": snap.step}).encode())
        base = ps.kv.sub(prefix)
        specs = [tensor_io.array_spec(leaf.shape, leaf.dtype, leaf.chunks, ps.options.compression)
                 for leaf in snap.leaves]
        # All opens (metadata writes), then all chunk writes, are in flight at once.
        opening = [tensor_io.open_for_write(base / layout.array_key(leaf.name), spec, ps.context, leader)
                   for leaf, spec in zip(snap.leaves, specs, strict=True)]
        futures = [tensor_io.write_chunks(f.result(), leaf.pieces)
                   for f, leaf in zip(opening, snap.leaves, strict=True)]
        nbytes = chunks = 0
        for i, (leaf, futs) in enumerate(zip(snap.leaves, futures, strict=True)):
            for f in futs:
                f.result()
            chunks += len(futs)
            nbytes += sum(d.nbytes for _, d in leaf.pieces)
            faults.point("after_leaves", i + 1)
        faults.point("after_data")
        ps.last_publish_stats = {"version": plan.version, "pieces_written": chunks,
                                 "bytes_written": nbytes, "write_s": time.time() - t0}
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
            "leaves": {
                leaf.name: {"key": layout.array_key(leaf.name), "shape": list(leaf.shape),
                            "dtype": leaf.dtype, "source_dtype": leaf.source_dtype, "chunks": leaf.chunks}
                for leaf in snap.leaves
            },
        }
        kv.put(layout.manifest_key(dirname), layout.encode_manifest(body))
        faults.point("after_manifest")
        _commit(ps, plan, body)
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
        entry = kv.read(layout.LATEST)
        latest = ps.parse_latest(entry.value) if entry.exists else None
        if latest is not None:
            ps.ensure_committed_index(latest)
            if latest.get("fence_epoch", latest["epoch"]) > plan.epoch:
                raise FencedError(f"publish of version {plan.version}: trainer epoch {plan.epoch} is fenced "
                                  f"out by epoch {latest['fence_epoch']} in {kv.url}{layout.LATEST}")
            if latest["version"] >= plan.version:
                raise PublishConflictError(
                    f"publish of version {plan.version}: LATEST in {kv.url} is already at version "
                    f"{latest['version']} (epoch {latest['epoch']}); another publisher committed first")
        fencing.check_epoch(kv, plan.epoch)
        faults.point("before_cas")
        record["committed_at"] = time.time()
        if kv.cas(layout.LATEST, json.dumps(record).encode(), entry.generation):
            break
    else:
        raise PublishConflictError(f"publish of version {plan.version}: LATEST in {kv.url} keeps changing")
    faults.point("after_cas")
    kv.put(layout.committed_key(plan.version), json.dumps(record).encode())


def _wait_for_hosts(ps, plan: Plan, nproc: int) -> None:
    prefix = layout.dir_prefix(plan.dirname) + "_done/"
    deadline = time.time() + ps.options.commit_timeout_s
    while len(ps.kv.list(prefix)) < nproc:
        if time.time() > deadline:
            raise PublishError(f"publish of version {plan.version}: only {len(ps.kv.list(prefix))} of "
                               f"{nproc} processes wrote their shards within {ps.options.commit_timeout_s}s")
        time.sleep(0.05)


def _wait_for_commit(ps, plan: Plan) -> None:
    deadline = time.time() + ps.options.commit_timeout_s
    failed_key = layout.dir_prefix(plan.dirname) + "_failed"
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
