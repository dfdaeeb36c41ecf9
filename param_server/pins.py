"""Reader pins: ``<tree>pins/<reader>`` holds the version a reader is using, with an expiry.

Garbage collection never deletes a version with an unexpired pin. A reader that dies simply
stops renewing; its pin expires and the janitor removes it.
"""

from __future__ import annotations

import json
import time

from param_server import layout
from rlax_tpu.kvstore import KVStore


def pin_key(keys: layout.TreeKeys, reader: str) -> str:
    if not reader:
        raise ValueError("a pin needs a non-empty reader name")
    return keys.pins + "~".join(layout._escape_segment(s) for s in reader.split("/"))


def pin(kv: KVStore, keys: layout.TreeKeys, version: int, reader: str, ttl_s: float) -> dict:
    now = time.time()
    record = {"reader": reader, "version": int(version), "pinned_at": now, "expires_at": now + ttl_s}
    kv.put(pin_key(keys, reader), json.dumps(record).encode())
    return record


def unpin(kv: KVStore, keys: layout.TreeKeys, reader: str) -> None:
    kv.delete(pin_key(keys, reader))


def read_pins(kv: KVStore, keys: layout.TreeKeys, now: float | None = None) -> dict[str, dict]:
    """All pins of a tree by key; unparsable ones come back as {"error": ...} and protect nothing."""
    now = time.time() if now is None else now
    out = {}
    for key, entry in kv.iter_values(keys.pins):
        try:
            rec = json.loads(entry.value)
            rec = {**rec, "version": int(rec["version"]), "expires_at": float(rec["expires_at"])}
            rec["expired"] = rec["expires_at"] <= now
        except (ValueError, KeyError, TypeError) as e:
            rec = {"error": f"corrupt pin: {e}", "expired": True}
        rec["generation"] = entry.generation
        out[key] = rec
    return out


def active_versions(pins: dict[str, dict]) -> set[int]:
    return {p["version"] for p in pins.values() if not p.get("expired", True)}
