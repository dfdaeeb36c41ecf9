"""VariableClient: a worker's view of the latest weights, fetched in a background thread.

After acme's VariableClient: ``update()`` never blocks (it swaps in weights the thread already
pulled), ``version`` always says which version ``params`` is and ``step`` which trainer step.
The client pins the version it holds (renewing the pin), refuses corrupt or incomplete versions
and falls back to the newest good one, and survives transient store errors (the last one is in
``error``). With ``store.delta`` it keeps a host copy of the weights it holds and applies each
delta version to it (or reads the nearest keyframe and the deltas after it when it joins late or
missed a version); every reconstructed leaf is checked against the manifest's crc32c. ``read``
replaces how a version becomes params (a LoRA reader merges adapters into its base:
param_server.adapters); a BadVersionError it raises refuses the version like any other.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import jax

from param_server import reconstruct
from param_server import store as store_module
from param_server.errors import BadVersionError, VersionNotFoundError
from param_server.store import ParamStore

log = logging.getLogger(__name__)


class VariableClient:
    def __init__(self, store: ParamStore, target: Any, reader: str, *, poll_interval_s: float | None = None,
                 start: bool = True, read: Any = None):
        self.store = store
        self._custom_read = read  # (version, reader) -> (params, manifest), or None
        self.target = target
        self.reader = reader
        self.poll_interval_s = store.options.poll_interval_s if poll_interval_s is None else poll_interval_s
        self.bad_versions: set[int] = set()
        self.error: BaseException | None = None
        self._params: Any = None
        self._version: int | None = None
        self._step: int | None = None
        self._manifest: dict | None = None
        self._pending: tuple[Any, int, int, dict] | None = None
        self._host: reconstruct.Held | None = None  # delta mode: host copy of the newest fetched version
        self._fetched: int | None = None  # newest version pulled (or refused) by the thread
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"variable-client-{reader}", daemon=True)
        if start:
            self._thread.start()

    @property
    def params(self) -> Any:
        return self._params

    @property
    def version(self) -> int | None:
        """Version of ``params`` (None before the first update that found weights)."""
        return self._version

    @property
    def step(self) -> int | None:
        """The trainer step whose weights ``params`` are (from the version's manifest)."""
        return self._step

    @property
    def manifest(self) -> dict | None:
        """The manifest of the version ``params`` are (its ``canary`` figures, ``step``, ...)."""
        return self._manifest

    def update(self) -> bool:
        """Swaps in newer weights if the thread has them; never blocks. True if they changed."""
        with self._cond:
            pending, self._pending = self._pending, None
        if pending is None:
            return False
        self._params, self._version, self._step, self._manifest = pending
        return True

    def update_and_wait(self, timeout: float | None = None, newer_than: int | None = None) -> bool:
        """Blocks until weights newer than ``newer_than`` (default: the current ones) arrive."""
        floor = self._version if newer_than is None else newer_than
        deadline = None if timeout is None else time.time() + timeout
        with self._cond:
            while not (self._pending and (floor is None or self._pending[1] > floor)):
                remaining = None if deadline is None else deadline - time.time()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining if remaining is not None else 1.0)
        self.update()
        return self._version is not None and (floor is None or self._version > floor)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.store.unpin(self.reader)
        except Exception as e:  # the pin simply expires
            log.warning("unpin of %s failed: %s", self.reader, e)

    def _run(self) -> None:
        last_pin = 0.0
        while not self._stop.is_set():
            try:
                floor = max([v for v in (self._fetched, *self.bad_versions) if v is not None], default=None)
                latest = self.store.wait_for_newer(floor, timeout=self.poll_interval_s)
                if latest is not None:
                    self._fetch(latest)
                held = self._version if self._pending is None else self._pending[1]
                if held is not None and time.time() - last_pin > self.store.options.pin_ttl_s / 3:
                    self.store.pin(held, self.reader)
                    last_pin = time.time()
                self.error = None
            except Exception as e:  # keep serving the weights we have; retry after a pause
                self.error = e
                log.warning("variable client %s: %s", self.reader, e)
                self._stop.wait(self.poll_interval_s)

    def _fetch(self, latest: int) -> None:
        candidates = [v for v in reversed(self.store.versions())
                      if v <= latest and v not in self.bad_versions]
        floor = self._fetched
        for v in candidates:
            if floor is not None and v <= floor:
                break  # nothing newer than what we hold is good
            try:
                params, manifest = self._read(v)
            except BadVersionError as e:
                log.warning("variable client %s refuses version %d: %s", self.reader, v, e)
                self.bad_versions.add(v)
                continue
            except VersionNotFoundError:
                continue  # garbage-collected between listing and reading
            with self._cond:
                self._pending = (params, v, int(manifest["step"]), manifest)
                self._fetched = v
                self._cond.notify_all()
            return

    def _read(self, v: int) -> tuple[Any, dict]:
        if self._custom_read is not None:
            return self._custom_read(v, self.reader)
        if not self.store.options.delta:
            return self.store.read(self.target, v, reader=self.reader)
        self.store.pin(v, self.reader)
        named, _, treedef = self.store.selected(self.target)
        store_module._check_tree(named, self.store.read_manifest(v)["leaves"], v)
        host = self.store.read_host(v, [n for n, _ in named], held=self._host)
        leaves = reconstruct.to_device(host, named, store_module._sharding_of)
        self._host = host  # only once the whole version checked out
        return jax.tree_util.tree_unflatten(treedef, leaves), host.manifest
