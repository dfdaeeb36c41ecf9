"""ParamStore: versioned weight snapshots in tensorstore, published by the trainer, pulled by workers.

See docs/param_server.md for the key layout and the guarantees. Bytes go straight between each
role and the storage service; the only synchronization is tensorstore's compare-and-swap.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from param_server import file_reads, layout, pins, publish, reconstruct, tensor_io
from param_server import gc as gc_pass
from param_server.errors import (
    BadVersionError,
    CorruptVersionError,
    IncompleteVersionError,
    PublishError,
    TreeMismatchError,
    VersionNotFoundError,
)
from rlax_tpu import fencing
from rlax_tpu.kvstore import KVStore

log = logging.getLogger(__name__)


# Queued async publishes before publish_async waits: bounds the host copies held in memory.
MAX_INFLIGHT_PUBLISHES = 2


@dataclasses.dataclass(frozen=True)
class Options:
    """The param-server fields of config.store, where each is defined and documented
    (rlax_tpu/config/sections/store.py); no defaults of their own."""

    publish_dtype: str
    gc_keep: int
    pin_ttl_s: float
    chunk_mib: float
    compression: str
    io_concurrency: int
    file_io_sync: bool
    poll_interval_s: float
    commit_timeout_s: float
    delta: bool
    keyframe_every: int
    delta_encoding: str
    direct_io: bool

    @classmethod
    def from_config(cls, c=None, **overrides) -> Options:
        """From the run config or its store section (None: the section's defaults), with
        ``overrides`` of single fields."""
        if c is None:
            from rlax_tpu.config.sections import store as store_section

            c = store_section.defaults()
        elif "store" in c:
            c = c.store
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown store option(s) {unknown}")
        return cls(**{f.name: overrides.get(f.name, c[f.name]) for f in dataclasses.fields(cls)})


class ParamStore:
    """Versioned weights in a kvstore. ``ParamStore.open(url)`` for readers and publishers."""

    def __init__(self, kv: KVStore, options: Options | None = None, epoch: int | None = None,
                 tree: str = layout.DEFAULT_TREE):
        self.kv = kv
        self.keys = layout.tree_keys(tree)
        self.options = options or Options.from_config()
        limit = {"limit": int(self.options.io_concurrency)}
        self.context = ts.Context({"data_copy_concurrency": limit})
        self.epoch = epoch
        self.last_publish_stats: dict = {}
        self._next_version = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: list[concurrent.futures.Future] = []
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        # The publisher's host copy of its newest committed version: what its next delta is against.
        self.held_by_publisher: reconstruct.Held | None = None
        self._direct: file_reads.DirectReader | None = None  # file:// chunk reads, made on first use

    @classmethod
    def open(cls, url: str | KVStore = "", workdir: str | None = None, *, config=None,
             epoch: int | None = None, tree: str = layout.DEFAULT_TREE, **overrides) -> ParamStore:
        """Opens the store at ``url`` (file://, gs://, memory://; '' = file://<workdir>/store/).

        ``config`` is the run config or its store section; keyword overrides win over it.
        A ``KVStore`` may be passed instead of a URL (memory:// stores are private to one open).
        ``tree`` names a tree of versions with its own LATEST ('' = the default tree).
        """
        options = Options.from_config(config, **overrides)
        if isinstance(url, KVStore):
            return cls(url, options, epoch, tree)
        if not url and config is not None:
            url = (config.store if "store" in config else config).url
        limit = {"limit": int(options.io_concurrency)}
        context = ts.Context({"file_io_sync": bool(options.file_io_sync), "file_io_concurrency": limit})
        return cls(KVStore.open(url, workdir, context=context), options, epoch, tree)

    def tree(self, name: str) -> ParamStore:
        """The same store's tree ``name`` (its own LATEST, versions, pins), sharing this run's epoch."""
        return ParamStore(self.kv, self.options, self.epoch, name)

    @property
    def url(self) -> str:
        return self.kv.url

    # ----------------------------------------------------------------------------------- queries

    @staticmethod
    def parse_latest(raw: bytes) -> dict:
        try:
            rec = json.loads(raw)
            rec["version"] = int(rec["version"])
            rec["dir"] = str(rec["dir"])
            rec.setdefault("fence_epoch", rec.get("epoch", 0))
            return rec
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptVersionError(-1, f"LATEST is corrupt ({e})") from e

    def latest(self) -> dict | None:
        """The LATEST record ({"version", "dir", "step", "epoch", "committed_at", ...}) or None."""
        raw = self.kv.get(self.keys.latest)
        return None if raw is None else self.parse_latest(raw)

    def latest_version(self) -> int | None:
        rec = self.latest()
        return None if rec is None else rec["version"]

    def versions(self) -> list[int]:
        """Committed versions still present, ascending (LATEST included)."""
        out = set()
        for key in self.kv.list(self.keys.committed):
            try:
                out.add(int(key[len(self.keys.committed) + 1:]))
            except ValueError:
                continue
        latest = self.latest_version()
        if latest is not None:
            out.add(latest)
        return sorted(out)

    def version_info(self, version: int) -> dict:
        latest = self.latest()
        if latest is not None and latest["version"] == version:
            return latest
        raw = self.kv.get(self.keys.committed_key(version))
        if raw is None:
            raise VersionNotFoundError(
                f"version {version} is not in {self.url} (never committed or garbage-collected); "
                f"versions present: {self.versions()}")
        return json.loads(raw)

    def committed_dir(self, version: int) -> str:
        return self.version_info(version)["dir"]

    def ensure_committed_index(self, latest: dict) -> None:
        """Repairs the index entry of LATEST if its publisher died right after the CAS."""
        key = self.keys.committed_key(latest["version"])
        if self.kv.get(key) is None:
            self.kv.put(key, json.dumps(latest).encode())

    def wait_for_newer(self, version: int | None, timeout: float | None = None) -> int | None:
        """Polls LATEST until it is newer than ``version``; returns it, or None on timeout."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            latest = self.latest_version()
            if latest is not None and (version is None or latest > version):
                return latest
            if deadline is not None and time.time() >= deadline:
                return None
            wait = self.options.poll_interval_s
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.time()))
            time.sleep(wait)

    # ------------------------------------------------------------------------------------ fencing

    def acquire_epoch(self, **info) -> int:
        """Makes this store object the run's publisher: bumps run.json's epoch and fences LATEST."""
        epoch = fencing.acquire_epoch(self.kv, **info)
        while True:  # mark LATEST so a stale publisher's CAS against an older generation fails
            entry = self.kv.read(self.keys.latest)
            if not entry.exists:
                break
            rec = self.parse_latest(entry.value)
            rec["fence_epoch"] = max(epoch, rec["fence_epoch"])
            if self.kv.cas(self.keys.latest, json.dumps(rec).encode(), entry.generation):
                break
        self.epoch = epoch
        return epoch

    # ------------------------------------------------------------------------------------ publish

    def publish(self, params: Any, step: int, *, keep_for: str | None = None, keep_s: float = 0.0,
                meta: dict | None = None, canary: dict | None = None) -> int:
        """Publishes ``params`` as a new version; returns it once it is visible (LATEST advanced).
        ``keep_for``: a reader name that pins the version for ``keep_s`` seconds (e.g. for the
        evaluator, which releases it once done). ``meta``: JSON facts kept in the manifest.
        ``canary``: the policy-landed check's figures for these weights
        (rlax_tpu.canary.figures), stored in the manifest."""
        return self._submit(params, step, False, keep_for, keep_s, meta, canary).result()

    def publish_async(self, params: Any, step: int, *, keep_for: str | None = None, keep_s: float = 0.0,
                      meta: dict | None = None, canary: dict | None = None) -> concurrent.futures.Future:
        """Copies device to host now; writes and commits in a background thread.

        Returns a future whose result is the version. A failed earlier async publish is re-raised
        here (and by ``flush``), so errors surface in the trainer even if nobody waits on futures.
        """
        return self._submit(params, step, True, keep_for, keep_s, meta, canary)

    def _submit(self, params: Any, step: int, surface_errors: bool, keep_for: str | None,
                keep_s: float, meta: dict | None = None, canary: dict | None = None) -> concurrent.futures.Future:
        self._raise_failure()
        while len(self._inflight) >= MAX_INFLIGHT_PUBLISHES:
            concurrent.futures.wait(self._inflight[:1])  # back-pressure: storage slower than training
            self._reap()
        snap = publish.snapshot(params, step, self.options.publish_dtype,
                                int(self.options.chunk_mib * 2**20))
        snap.meta = dict(meta or {})
        snap.canary = canary
        plan = self._plan(snap)
        if keep_for and snap.process_index == 0:  # pinned before it exists: gc can never take it
            self.pin(plan.version, keep_for, keep_s)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="param-publish")
        fut = self._executor.submit(publish.write_and_commit, self, snap, plan)
        if surface_errors:
            fut.add_done_callback(self._on_done)
        self._inflight.append(fut)
        return fut

    def flush(self) -> None:
        """Waits for every pending async publish; raises the first failure."""
        concurrent.futures.wait(list(self._inflight))
        self._reap()
        self._raise_failure()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _on_done(self, fut: concurrent.futures.Future) -> None:
        if fut.exception() is not None:
            with self._lock:
                self._failure = self._failure or fut.exception()

    def _reap(self) -> None:
        self._inflight = [f for f in self._inflight if not f.done()]

    def _raise_failure(self) -> None:
        self._reap()
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise PublishError(f"an earlier asynchronous publish failed: {failure}") from failure

    def _plan(self, snap: publish.Snapshot) -> publish.Plan:
        """Version number and epoch, decided by process 0 and shared by all hosts."""
        if snap.process_index == 0:
            if self.epoch is None:
                self.acquire_epoch(role="trainer")
            latest = self.latest_version()
            version = max(self._next_version, (latest or 0) + 1)
            values = np.array([version, self.epoch], np.int64)
        else:
            values = np.zeros(2, np.int64)
        if snap.process_count > 1:
            from jax.experimental import multihost_utils

            values = np.asarray(multihost_utils.broadcast_one_to_all(values))
        version, epoch = int(values[0]), int(values[1])
        self.epoch = epoch
        self._next_version = version + 1  # never reuse a number: a failed attempt's dir stays unique
        return publish.Plan(version, epoch)

    # --------------------------------------------------------------------------------------- pull

    def pull(self, target: Any, version: int | None = None, *, fallback: bool = False,
             reader: str | None = None, leaves: Any = None) -> tuple[Any, int]:
        """Reads a version into the shardings and dtypes of ``target`` (ShapeDtypeStructs).

        ``version=None`` reads LATEST. With ``fallback=True`` a corrupt or incomplete version is
        skipped for the newest older good one. ``reader`` pins the version being read.
        ``leaves``: leaf names or name prefixes ending in '/' to read (others come back None).
        """
        if version is None:
            version = self.latest_version()
            if version is None:
                raise VersionNotFoundError(f"no version has been published in {self.url} yet")
        candidates = [version]
        if fallback:
            candidates += [v for v in reversed(self.versions()) if v < version]
        first_error: BadVersionError | None = None
        for v in candidates:
            try:
                return self.read(target, v, reader, leaves=leaves)[0], v
            except BadVersionError as e:
                if not fallback:
                    raise
                log.warning("refusing version %d: %s", v, e)
                first_error = first_error or e
        raise first_error

    def read_manifest(self, version: int) -> dict:
        dirname = self.committed_dir(version)
        raw = self.kv.get(self.keys.manifest_key(dirname))
        if raw is None:
            raise IncompleteVersionError(version, f"version {version}: manifest "
                                         f"{self.url}{self.keys.manifest_key(dirname)} is missing")
        try:
            return layout.decode_manifest(raw)
        except ValueError as e:
            raise CorruptVersionError(
                version, f"version {version}: {self.url}{self.keys.manifest_key(dirname)}: {e}") from e

    def selected(self, target: Any, leaves: Any = None) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], Any]:
        """(every named target leaf, the selected ones, treedef) for a ``leaves`` selection."""
        named, treedef = layout.flatten(target)
        if leaves is None:
            return named, named, treedef
        wanted = [leaves] if isinstance(leaves, str) else list(leaves)
        pick = [(n, t) for n, t in named if any(n == w or (w.endswith("/") and n.startswith(w)) for w in wanted)]
        if not pick:
            raise TreeMismatchError(f"no target leaf matches the selection {wanted[:5]}")
        return named, pick, treedef

    def read(self, target: Any, version: int, reader: str | None = None, *, leaves: Any = None,
             held: reconstruct.Held | None = None) -> tuple[Any, dict]:
        """Reads one version into the shardings and dtypes of ``target``; returns it with its
        manifest (whose "step" and "epoch" say which trainer weights these are).

        ``leaves`` selects a subset (see ``pull``). A delta version is reconstructed on the host
        (from ``held`` if it holds the delta's base, else from the nearest keyframe)."""
        if reader:
            self.pin(version, reader)
        manifest = self.read_manifest(version)
        named, pick, treedef = self.selected(target, leaves)
        _check_tree(pick, manifest["leaves"], version, partial=leaves is not None)
        if manifest.get("kind", "keyframe") == "delta" or held is not None:
            host = self.read_host(version, [n for n, _ in pick], held)
            got = dict(zip([n for n, _ in pick], reconstruct.to_device(host, pick, _sharding_of), strict=True))
        else:
            got = self._read_slices(pick, manifest, version)
        return jax.tree_util.tree_unflatten(treedef, [got.get(n) for n, _ in named]), manifest

    def read_host(self, version: int, names: list[str], held: reconstruct.Held | None = None) -> reconstruct.Held:
        """Whole leaves ``names`` of ``version`` on the host (publish dtype), every one checked
        against its crc32c; applies deltas to ``held`` when it is on the version's chain."""
        if held is not None and not set(names) <= set(held.arrays):
            held = None
        return reconstruct.read(self, version, names, held)

    def _read_slices(self, pick: list[tuple[str, Any]], manifest: dict, version: int) -> dict[str, Any]:
        """A keyframe, each device reading only the chunks that overlap its slices."""
        entries = manifest["leaves"]
        if all(file_reads.supported(self.url, manifest, entries[name]) for name, _ in pick):
            return self._read_direct(pick, manifest, version)
        # All opens, then all reads of every leaf, are in flight at once.
        opens = [tensor_io.open_for_read(
            self.kv.sub(self.keys.dir_prefix(layout.entry_dir(entries[name], manifest))) / entries[name]["key"],
            entries[name], self.context) for name, _ in pick]
        pending = []
        for (name, t), fut in zip(pick, opens, strict=True):
            key = entries[name]["key"]
            try:
                arr = fut.result()
            except Exception as e:
                raise tensor_io.classify(version, name, key, e) from e
            sharding = _sharding_of(t)
            indices = list({tensor_io.index_key(i): i for i in
                            sharding.addressable_devices_indices_map(tuple(t.shape)).values()}.values())
            pending.append((name, t, sharding, tensor_io.PendingRead(arr, indices, version, name, key)))
        out = {}
        for name, t, sharding, pr in pending:
            data = pr.results()
            dtype = jnp.dtype(t.dtype)

            def cb(index, data=data, dtype=dtype):
                return np.asarray(data[tensor_io.index_key(index)]).astype(dtype, copy=False)

            out[name] = jax.make_array_from_callback(tuple(t.shape), sharding, cb)
        return out

    def read_direct(self, manifest: dict, name: str, indices: list[tuple], version: int) -> file_reads.PendingDirect:
        """Reads of one full leaf's slices straight from its chunk files (file:// stores)."""
        if self._direct is None:
            self._direct = file_reads.DirectReader(int(self.options.io_concurrency), bool(self.options.direct_io))
        e = manifest["leaves"][name]
        path = os.path.join(file_reads.root_of(self.url),
                            self.keys.dir_prefix(layout.entry_dir(e, manifest)) + e["key"])
        return self._direct.read(path, e, indices, version, name)

    def _read_direct(self, pick: list[tuple[str, Any]], manifest: dict, version: int) -> dict[str, Any]:
        pending = []
        for name, t in pick:  # every chunk read of every leaf in flight at once
            sharding = _sharding_of(t)
            indices = list({tensor_io.index_key(i): i for i in
                            sharding.addressable_devices_indices_map(tuple(t.shape)).values()}.values())
            pending.append((name, t, sharding, self.read_direct(manifest, name, indices, version)))
        out = {}
        for name, t, sharding, pr in pending:
            data, dtype = pr.results(), jnp.dtype(t.dtype)
            out[name] = jax.make_array_from_callback(
                tuple(t.shape), sharding,
                lambda index, d=data, dt=dtype: d[tensor_io.index_key(index)].astype(dt, copy=False))
        return out

    # ---------------------------------------------------------------------------------- pins, gc

    def pin(self, version: int, reader: str, ttl_s: float | None = None) -> dict:
        return pins.pin(self.kv, self.keys, version, reader,
                        self.options.pin_ttl_s if ttl_s is None else ttl_s)

    def unpin(self, reader: str) -> None:
        pins.unpin(self.kv, self.keys, reader)

    def pins(self, now: float | None = None) -> dict[str, dict]:
        return pins.read_pins(self.kv, self.keys, now)

    def gc(self, keep: int | None = None, now: float | None = None) -> dict:
        """Deletes committed versions beyond the newest ``keep``, except LATEST, pinned ones and
        every version their delta chains need; deletes a version directory only once no kept
        version's manifest names it; also orphaned attempts and expired pins."""
        keep = self.options.gc_keep if keep is None else keep
        if keep < 1:
            raise ValueError(f"gc keep={keep}: must be >= 1")
        return gc_pass.collect(self, keep, now)


def _sharding_of(t: Any) -> jax.sharding.Sharding:
    sharding = getattr(t, "sharding", None)
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _check_tree(named: list[tuple[str, Any]], entries: dict, version: int, partial: bool = False) -> None:
    names = {n for n, _ in named}
    for name, t in named:
        if name not in entries:
            near = sorted(entries)[:5]
            raise TreeMismatchError(f"target leaf {name!r} is not in version {version} "
                                    f"(published leaves include {near})")
        e = entries[name]
        if tuple(t.shape) != tuple(e["shape"]):
            raise TreeMismatchError(f"leaf {name!r}: target shape {tuple(t.shape)} != published shape "
                                    f"{tuple(e['shape'])} in version {version}")
        want, have = jnp.dtype(t.dtype), jnp.dtype(e["dtype"])
        if want != have and not (jnp.issubdtype(want, jnp.floating) and jnp.issubdtype(have, jnp.floating)):
            raise TreeMismatchError(f"leaf {name!r}: target dtype {want} cannot hold published dtype {have} "
                                    f"in version {version}")
    missing = sorted(set(entries) - names)
    if missing and not partial:
        raise TreeMismatchError(f"version {version} has leaves the target lacks: {missing[:5]}")
