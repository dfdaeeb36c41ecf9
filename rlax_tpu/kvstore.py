"""The run's key-value store: one tensorstore kvstore URL shared by every role.

Every role (trainer, inference workers, the param-server janitor) opens the same URL
(``config.store.url``). tensorstore's kvstore gives read, write, list, delete and
compare-and-swap (``if_equal=generation``); that CAS is the only synchronization primitive the
project uses, so no extra server is needed at any scale (file:// on one machine, gs:// on cloud,
memory:// in unit tests, where it is private to the process).

This module is the one place that talks to ``ts.KvStore`` directly, so the param server and the
replay queue share one notion of generations and one set of error messages.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import tensorstore as ts

SUPPORTED_SCHEMES = ("file://", "gs://", "memory://")

# tensorstore's generation of a missing key. A conditional write with it succeeds only if the key
# is still absent. Beware: ``if_equal=b""`` is NOT that; an empty generation means unconditional.
NO_VALUE = b"\x02"


class StoreError(RuntimeError):
    """A store operation failed; the message names the URL or key."""


def resolve_url(url: str, workdir: str | None = None) -> str:
    """Returns the normalized store URL: '' means ``file://<workdir>/store/``.

    The URL always ends with '/', so keys are plain relative paths beneath it.
    """
    if not url:
        if not workdir:
            raise StoreError("config.store.url is empty and no workdir was given to derive it")
        url = "file://" + os.path.abspath(os.path.join(workdir, "store"))
    if not url.startswith(SUPPORTED_SCHEMES):
        raise StoreError(
            f"config.store.url={url!r}: unknown scheme; expected one of {', '.join(SUPPORTED_SCHEMES)}"
        )
    if not url.endswith("/"):
        url += "/"
    return url


@dataclasses.dataclass(frozen=True)
class Entry:
    """A value read from the store with the generation needed to CAS it."""

    value: bytes | None  # None when the key is missing
    generation: bytes  # for a missing key, NO_VALUE: a CAS with it means "create if absent"

    @property
    def exists(self) -> bool:
        return self.value is not None


class KVStore:
    """A small typed facade over ``ts.KvStore`` with compare-and-swap.

    Keys are relative to the store URL (``params/LATEST``, ``tasks/000123``).
    """

    def __init__(self, url: str, kvstore: ts.KvStore):
        self.url = url
        self._kv = kvstore

    @classmethod
    def open(cls, url: str, workdir: str | None = None, context: ts.Context | None = None) -> KVStore:
        """Opens the store at ``url``; ``context`` sets tensorstore resources (e.g. file_io_sync)."""
        url = resolve_url(url, workdir)
        if url.startswith("file://"):
            root = url[len("file://") :]
            try:
                os.makedirs(root, exist_ok=True)
            except OSError as e:
                raise StoreError(f"store {url!r}: cannot create directory {root!r}: {e}") from e
            if not os.access(root, os.W_OK):
                raise StoreError(f"store {url!r}: directory {root!r} is not writable")
        try:
            kv = ts.KvStore.open(url, context=context).result()
        except Exception as e:  # tensorstore raises ValueError with its own wording
            raise StoreError(f"store {url!r}: cannot open: {e}") from e
        return cls(url, kv)

    def sub(self, prefix: str) -> ts.KvStore:
        """The underlying kvstore rooted at ``prefix`` (shares memory:// state and the context)."""
        return self._kv / prefix

    def read(self, key: str) -> Entry:
        try:
            r = self._kv.read(key).result()
        except Exception as e:
            raise StoreError(f"store {self.url!r}: read of key {key!r} failed: {e}") from e
        if r.state == "value":
            return Entry(bytes(r.value), r.stamp.generation)
        return Entry(None, r.stamp.generation or NO_VALUE)

    def get(self, key: str) -> bytes | None:
        return self.read(key).value

    def put(self, key: str, value: bytes) -> None:
        try:
            self._kv.write(key, value).result()
        except Exception as e:
            raise StoreError(f"store {self.url!r}: write of key {key!r} failed: {e}") from e

    def cas(self, key: str, value: bytes | None, generation: bytes) -> bool:
        """Writes (or deletes, with value None) only if the key is still at ``generation``.

        ``generation=NO_VALUE`` means "only if absent". Returns False when another writer won.
        """
        if not generation:
            raise StoreError(f"cas of {key!r}: empty generation would make the write unconditional")
        try:
            r = self._kv.write(key, value, if_equal=generation).result()
        except Exception as e:
            raise StoreError(f"store {self.url!r}: conditional write of {key!r} failed: {e}") from e
        # A failed CAS does not raise: tensorstore returns an empty generation.
        return bool(r.generation)

    def create(self, key: str, value: bytes) -> bool:
        """Writes ``value`` only if ``key`` does not exist yet; False if it already did."""
        return self.cas(key, value, NO_VALUE)

    def delete(self, key: str) -> None:
        try:
            self._kv.delete_range(ts.KvStore.KeyRange(key, key + "\x00")).result()
        except Exception as e:
            raise StoreError(f"store {self.url!r}: delete of {key!r} failed: {e}") from e

    def delete_prefix(self, prefix: str) -> None:
        try:
            self._kv.delete_range(ts.KvStore.KeyRange(prefix, _prefix_end(prefix))).result()
        except Exception as e:
            raise StoreError(f"store {self.url!r}: delete of prefix {prefix!r} failed: {e}") from e

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under ``prefix`` (full keys, prefix included)."""
        try:
            if prefix:
                keys = self._kv.list(ts.KvStore.KeyRange(prefix, _prefix_end(prefix))).result()
            else:
                keys = self._kv.list().result()
        except Exception as e:
            raise StoreError(f"store {self.url!r}: list of {prefix!r} failed: {e}") from e
        return sorted(k.decode() if isinstance(k, bytes) else k for k in keys)

    def iter_values(self, prefix: str) -> Iterator[tuple[str, Entry]]:
        for key in self.list(prefix):
            entry = self.read(key)
            if entry.exists:
                yield key, entry


def _prefix_end(prefix: str) -> str:
    """The exclusive upper bound of all keys that start with ``prefix``."""
    if not prefix:
        return ""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
