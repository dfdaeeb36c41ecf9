"""A snapshot of the store's health for the status command: versions, pins, LATEST, workers."""

from __future__ import annotations

import json
import time

from param_server import layout
from param_server.errors import ParamServerError
from param_server.store import ParamStore
from rlax_tpu import fencing
from rlax_tpu.store import StoreError


def collect(store: ParamStore, now: float | None = None) -> dict:
    """Everything the status command shows, as plain data; damaged records are reported, not fatal."""
    now = time.time() if now is None else now
    out: dict = {"url": store.url, "now": now}
    try:
        out["run"] = fencing.read_run(store.kv)
    except RuntimeError as e:
        out["run"] = {"error": str(e)}
    try:
        latest = store.latest()
    except ParamServerError as e:
        latest, out["latest"] = None, {"error": str(e)}
    if latest is not None:
        out["latest"] = {**latest, "age_s": now - latest.get("committed_at", now)}
    elif "latest" not in out:
        out["latest"] = None
    pins = store.pins(now)
    out["pins"] = [{"key": k[len(layout.PINS):], **{f: v for f, v in p.items() if f != "generation"},
                    "expires_in_s": p["expires_at"] - now if "expires_at" in p else None}
                   for k, p in pins.items()]
    versions = []
    for v in store.versions():
        try:
            info = store.version_info(v)
            versions.append({"version": v, "step": info.get("step"), "epoch": info.get("epoch"),
                             "bytes": info.get("total_bytes"), "dir": info.get("dir"),
                             "committed_at": info.get("committed_at"),
                             "pinned_by": sorted(p.get("reader", "?") for p in pins.values()
                                                 if p.get("version") == v and not p.get("expired"))})
        except (ParamServerError, StoreError, ValueError) as e:
            versions.append({"version": v, "error": str(e)})
    out["versions"] = versions
    out["pending_attempts"] = [k[len(layout.ATTEMPTS):] for k in store.kv.list(layout.ATTEMPTS)
                               if not any(x.get("dir") == k[len(layout.ATTEMPTS):] for x in versions)]
    workers = {}
    for key in store.kv.list(layout.WORKERS):
        raw = store.kv.get(key)
        name = key[len(layout.WORKERS):]
        try:
            workers[name] = json.loads(raw) if raw is not None else {"error": "vanished"}
        except (ValueError, UnicodeDecodeError) as e:
            workers[name] = {"error": f"corrupt heartbeat ({e})"}
    out["workers"] = workers
    return out


def _age(seconds) -> str:
    return "?" if seconds is None else f"{seconds:.1f}s"


def render(s: dict) -> str:
    """Human-readable form of ``collect``'s result."""
    lines = [f"store: {s['url']}", f"run: {json.dumps(s['run'], sort_keys=True)}"]
    latest = s["latest"]
    if latest is None:
        lines.append("LATEST: none (nothing published yet)")
    elif "error" in latest:
        lines.append(f"LATEST: ERROR {latest['error']}")
    else:
        lines.append(f"LATEST: version {latest['version']} step {latest.get('step')} "
                     f"epoch {latest.get('epoch')} age {_age(latest['age_s'])}")
    lines.append(f"versions ({len(s['versions'])}):")
    for v in s["versions"]:
        if "error" in v:
            lines.append(f"  v{v['version']}: ERROR {v['error']}")
            continue
        mib = (v["bytes"] or 0) / 2**20
        pinned = f" pinned by {', '.join(v['pinned_by'])}" if v["pinned_by"] else ""
        lines.append(f"  v{v['version']}: step {v['step']} epoch {v['epoch']} {mib:.2f} MiB{pinned}")
    if s["pending_attempts"]:
        lines.append(f"uncommitted attempts: {', '.join(s['pending_attempts'])}")
    lines.append(f"pins ({len(s['pins'])}):")
    for p in s["pins"]:
        if "error" in p:
            lines.append(f"  {p['key']}: ERROR {p['error']}")
        else:
            state = "expired" if p["expired"] else f"expires in {_age(p['expires_in_s'])}"
            lines.append(f"  {p['reader']}: version {p['version']} ({state})")
    lines.append(f"workers ({len(s['workers'])}):")
    for name, hb in sorted(s["workers"].items()):
        if "error" in hb:
            lines.append(f"  {name}: ERROR {hb['error']}")
            continue
        seen = hb.get("time", hb.get("heartbeat_at", hb.get("updated_at")))
        age = f" last seen {_age(s['now'] - seen)} ago" if isinstance(seen, (int, float)) else ""
        lines.append(f"  {name}:{age} {json.dumps(hb, sort_keys=True)}")
    return "\n".join(lines)
