"""Garbage collection of one tree by reference.

Roots are the newest ``keep`` committed versions, LATEST and every version with an unexpired
pin. A root keeps its whole delta chain (each delta's ``base`` back to a keyframe), and a kept
version keeps every directory its manifest names (leaves that point at an older version's
bytes). Other versions lose their index entry first (they leave ``versions()``), then their
directory unless a kept manifest still names it; such a directory stays an attempt record and
goes once nothing names it any more.
"""

from __future__ import annotations

from param_server import layout, pins
from param_server.errors import BadVersionError, VersionNotFoundError


def collect(ps, keep: int, now: float | None = None) -> dict:
    latest = ps.latest()
    if latest is None:
        return {"deleted": [], "kept": [], "orphans": [], "expired_pins": []}
    ps.ensure_committed_index(latest)
    current_pins = ps.pins(now)
    committed = ps.versions()
    dirs = {}
    for v in committed:
        try:
            dirs[v] = ps.committed_dir(v)
        except VersionNotFoundError:
            continue
    roots = set(committed[-keep:]) | {latest["version"]} | (pins.active_versions(current_pins) & set(dirs))
    needed, named_dirs, unreadable = set(), set(), []
    stack = sorted(roots)
    while stack:
        v = stack.pop()
        if v in needed or v not in dirs:
            continue
        needed.add(v)
        named_dirs.add(dirs[v])
        try:
            m = ps.read_manifest(v)
        except (BadVersionError, VersionNotFoundError):
            unreadable.append(v)  # its references are unknown: keep every older version
            continue
        named_dirs |= layout.dirs_named(m)
        if m.get("base") is not None:
            stack.append(int(m["base"]))
    if unreadable:
        needed |= {v for v in dirs if v < max(unreadable)}
        named_dirs |= {dirs[v] for v in needed}
    deleted = []
    for v in committed:
        if v in needed or v not in dirs:
            continue
        # Index first: the version leaves versions() before its bytes go.
        ps.kv.delete(ps.keys.committed_key(v))
        if dirs[v] not in named_dirs:
            ps.kv.delete_prefix(ps.keys.dir_prefix(dirs[v]))
            ps.kv.delete(ps.keys.attempts + dirs[v])
        deleted.append(v)
    orphans = []
    for key in ps.kv.list(ps.keys.attempts):
        dirname = key[len(ps.keys.attempts):]
        parsed = layout.parse_dir(dirname)
        if parsed is None or parsed[0] > latest["version"] or dirname in named_dirs:
            continue  # possibly in progress, or committed and kept, or named by a kept version
        if dirs.get(parsed[0]) == dirname and parsed[0] not in deleted:
            continue
        ps.kv.delete_prefix(ps.keys.dir_prefix(dirname))
        ps.kv.delete(key)
        orphans.append(dirname)
    expired = []
    for key, p in current_pins.items():
        if p.get("expired") and ps.kv.cas(key, None, p["generation"]):
            expired.append(key[len(ps.keys.pins):])
    return {"deleted": deleted, "kept": sorted(set(committed) - set(deleted)), "orphans": orphans,
            "expired_pins": expired}
