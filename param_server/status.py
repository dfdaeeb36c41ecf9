"""A snapshot of the store's health for the status command: versions, pins, LATEST, workers."""

from __future__ import annotations

import json
import time

from param_server.errors import ParamServerError
from param_server.store import ParamStore
from rlax_tpu import fencing, store_layout
from rlax_tpu.kvstore import StoreError


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
    out["pins"] = [{"key": k[len(store.keys.pins):], **{f: v for f, v in p.items() if f != "generation"},
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
    out["pending_attempts"] = [k[len(store.keys.attempts):] for k in store.kv.list(store.keys.attempts)
                               if not any(x.get("dir") == k[len(store.keys.attempts):] for x in versions)]
    workers = {}
    for key in store.kv.list(store_layout.WORKERS):
        raw = store.kv.get(key)
        name = key[len(store_layout.WORKERS):]
        try:
            workers[name] = store_layout.Heartbeat.decode(raw, name).as_dict() if raw is not None \
                else {"error": "vanished"}
        except store_layout.HeartbeatError as e:
            workers[name] = {"error": f"corrupt heartbeat ({e})"}
    out["workers"] = workers
    return out


def _age(seconds) -> str:
    return "?" if seconds is None else f"{seconds:.1f}s"


def render(s: dict, heartbeat_s: float | None = None) -> str:
    """Human-readable form of ``collect``'s result.

    ``heartbeat_s`` (config.replay.heartbeat_seconds): a running worker silent for more than three
    heartbeats is flagged STALE (killed without a goodbye, or hung).
    """
    lines = [f"store: {s['url']}", _render_run(s["run"], s["now"])]
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
        lines.append(f"  {name}: {_render_worker(hb, s['now'], heartbeat_s)}")
    return "\n".join(lines)


def _render_run(run: dict, now: float) -> str:
    if "error" in run:
        return f"run: ERROR {run['error']}"
    if not run.get("epoch"):
        return "run: no trainer has started (epoch 0)"
    parts = [f"trainer epoch {run['epoch']}"]
    if isinstance(run.get("acquired_at"), (int, float)):
        parts.append(f"started {_age(now - run['acquired_at'])} ago")
    parts += [f"{k} {run[k]}" for k in ("pid", "host", "workdir") if run.get(k) is not None]
    extra = {k: v for k, v in run.items() if k not in ("epoch", "acquired_at", "pid", "host", "workdir")}
    return "run: " + ", ".join(parts) + (f" {json.dumps(extra, sort_keys=True)}" if extra else "")


_HB_COUNTERS = ("lost", "taken_over", "late_writes_ignored", "lease_conflicts", "corrupt_tasks", "corrupt_leases",
                "canary_failed")


def _render_worker(d: dict, now: float, heartbeat_s: float | None) -> str:
    hb = store_layout.Heartbeat.from_dict(d)
    parts = [hb.state]
    if hb.time:
        stale = heartbeat_s is not None and hb.state == "running" and not hb.alive(heartbeat_s, now)
        parts.append(f"last seen {_age(hb.age(now))} ago" + (" STALE" if stale else ""))
    if hb.pid is not None:
        parts.append(f"pid {hb.pid}" + (f"@{hb.host}" if hb.host else ""))
    if hb.weights_step is not None:
        parts.append(f"weights step {hb.weights_step}")
    if "tasks_done" in d:
        parts.append(f"groups done {hb.tasks_done}")
    if "leases" in d:
        held = hb.leases
        parts.append(f"leases {len(held)}" + (f" ({' '.join(held[:8])}{' ...' if len(held) > 8 else ''})"
                                              if held else ""))
    nonzero = [f"{k} {hb.counters[k]}" for k in _HB_COUNTERS if hb.counters.get(k)]
    if nonzero:
        parts.append(", ".join(nonzero))
    return ", ".join(parts) + (f" {json.dumps(hb.extra, sort_keys=True)}" if hb.extra else "")
