"""LoRA publishing: the frozen base once in tree ``base``, each policy version in tree
``adapter`` holding the adapters only and naming its base by content hash; readers merge.

Publisher (the trainer)::

    pub = AdapterPublisher(store)                      # store: the run's ParamStore
    pub.publish_base(base_params)                      # once; skipped when the store has it already
    pub.store.publish_async(adapters, step, meta=pub.meta(spec))

Reader (a worker, the evaluator)::

    reader = AdapterReader(store, base_target, adapter_target, spec, name="worker-3")
    merged, manifest = reader.read(version)            # W0 + s A @ B from the pristine base

The reader keeps the base exactly as pulled (never modified) and merges every adapter version
into it afresh, so merged weights never drift however many versions it has swapped through. An
adapter whose base hash differs from the base it holds makes it pull that base from tree
``base`` (checked against the hash); when no such base exists it refuses the version with
``BaseMismatchError`` rather than merge onto the wrong weights.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import numpy as np

from param_server.errors import BadVersionError, CorruptVersionError
from param_server.store import ParamStore
from rlax_tpu.models import lora

log = logging.getLogger(__name__)

BASE_TREE, ADAPTER_TREE = "base", "adapter"


class BaseMismatchError(BadVersionError):
    """An adapter version names a base (content hash) this reader does not hold and cannot pull,
    or whose LoRA settings differ from the reader's."""


def as_stored(params: Any, publish_dtype: str) -> Any:
    """``params`` as the store holds them: floating leaves cast to the publish dtype."""
    def cast(x):
        return x.astype(publish_dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x

    return jax.tree.map(cast, params)


def host_hash(params: Any, publish_dtype: str) -> str:
    """The content hash of ``params`` as the store holds them (floating leaves in the publish dtype)."""
    return lora.content_hash(jax.tree.map(np.asarray, as_stored(params, publish_dtype)))


def spec_meta(spec: lora.LoraSpec) -> dict:
    return {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)}


class AdapterPublisher:
    """The trainer's side: ``store`` is the adapter tree, ``base_store`` the base tree. ``root``
    must hold the run's epoch already (``acquire_epoch``): both trees publish under it."""

    def __init__(self, root: ParamStore):
        self.base_store = root.tree(BASE_TREE)
        self.store = root.tree(ADAPTER_TREE)
        self.base_hash: str | None = None

    def publish_base(self, base: Any, step: int = 0) -> str:
        """Publishes the frozen base unless the newest base version already is it; returns its hash."""
        self.base_hash = host_hash(base, self.store.options.publish_dtype)
        latest = self.base_store.latest_version()
        if latest is not None and self.base_store.read_manifest(latest).get("meta", {}).get(
                "content_hash") == self.base_hash:
            log.info("base weights %s… already published (base v%d)", self.base_hash[:12], latest)
            return self.base_hash
        version = self.base_store.publish(base, step, meta={"content_hash": self.base_hash})
        log.info("published the frozen base as base v%d (%s…)", version, self.base_hash[:12])
        return self.base_hash

    def meta(self, spec: lora.LoraSpec) -> dict:
        """The manifest facts of an adapter version: its base and its LoRA settings."""
        if self.base_hash is None:
            raise RuntimeError("publish_base must come before the first adapter version")
        return {"base_hash": self.base_hash, "lora": spec_meta(spec)}


class AdapterReader:
    """A reader's side: pulls adapter versions and returns them merged into its pristine base."""

    def __init__(self, root: ParamStore, base_target: Any, adapter_target: Any, spec: lora.LoraSpec, name: str):
        self.base_store = root.tree(BASE_TREE)
        self.store = root.tree(ADAPTER_TREE)
        self.base_target, self.adapter_target, self.spec, self.name = base_target, adapter_target, spec, name
        self.base: Any = None  # exactly as pulled; never modified
        self.base_hash: str | None = None
        shardings = jax.tree.map(lambda t: t.sharding, base_target)
        self._merge = jax.jit(functools.partial(lora.merge, scale=spec.scale), out_shardings=shardings)

    def read(self, version: int, reader: str | None = None) -> tuple[Any, dict]:
        """(merged weights in the layout of ``base_target``, the adapter version's manifest)."""
        adapters, manifest = self.store.read(self.adapter_target, version, reader=reader)
        meta = manifest.get("meta", {})
        if meta.get("lora") != spec_meta(self.spec):
            raise BaseMismatchError(version, f"adapter version {version} has LoRA settings {meta.get('lora')}, "
                                             f"this reader {spec_meta(self.spec)} (config.lora)")
        want = meta.get("base_hash")
        if want != self.base_hash:
            self.load_base(want, version)
        return self.merge(adapters), manifest

    def merge(self, adapters: Any) -> Any:
        """The held base with ``adapters`` merged in (a new tree; the base stays as pulled)."""
        return self._merge(self.base, adapters)

    def load_base(self, want: str | None, version: int) -> None:
        """Pulls the base whose content hash is ``want`` (for adapter ``version``) and holds it."""
        for v in reversed(self.base_store.versions()):
            manifest = self.base_store.read_manifest(v)
            if manifest.get("meta", {}).get("content_hash") != want:
                continue
            params, _ = self.base_store.read(self.base_target, v, reader=self.name)
            got = host_hash(params, manifest["publish_dtype"])
            if got != want:
                raise CorruptVersionError(v, f"base v{v}: its weights hash to {got[:12]}…, its manifest "
                                             f"says {str(want)[:12]}…")
            self.base, self.base_hash = params, want
            log.info("%s: base v%d (%s…) pulled for adapter version %d", self.name, v, want[:12], version)
            return
        raise BaseMismatchError(version, f"adapter version {version} needs base {str(want)[:12]}…, which "
                                         f"{self.name} does not hold and tree {BASE_TREE!r} of "
                                         f"{self.base_store.url} does not have (held: "
                                         f"{(self.base_hash or 'none')[:12]})")
