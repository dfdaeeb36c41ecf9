"""The resolved config of a run, kept in ``<workdir>/config.json`` and checked on resume.

The trainer writes the config it starts with (file, variant and overrides resolved); every role
that starts in the workdir later compares its own config with it. A resumed run may change only
how long it trains and how it is laid out, run and watched (``MAY_CHANGE``); any other field
would train a different run on top of the old one's checkpoint, store and tokenizer, so start-up
fails with a ConfigError naming each such field and both values.
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections

from rlax_tpu.config.errors import ConfigError

FILENAME = "config.json"
log = logging.getLogger(__name__)

# Fields (or whole sections) a resumed run may change. Everything else is the run's identity:
# model, tokenizer, task and data, the RL objective, the optimizer, batch shapes, sampling, the
# weights' publish dtype and the store location.
MAY_CHANGE = (
    "name", "trainer.steps", "trainer.checkpoint_every", "trainer.keep_checkpoints",
    "trainer.async_checkpoint", "trainer.log_every", "trainer.tensorboard", "trainer.sigterm_grace_s",
    "trainer.multihost", "trainer.remat", "trainer.micro_batches", "mesh", "inference.mesh",
    "inference.max_batch", "inference.max_prefill_batch", "inference.decode_chunk",
    "inference.max_decode_chunk", "inference.meta_timeout_s", "inference.weights_timeout_s",
    "store.gc_keep", "store.pin_ttl_s", "store.janitor_interval_s", "store.io_concurrency",
    "store.file_io_sync", "store.direct_io", "store.poll_interval_s", "store.commit_timeout_s", "store.chunk_mib",
    "store.compression", "store.canary_prompts", "store.canary_tokens", "store.canary_tolerance",
    "replay.lease_seconds", "replay.poll_seconds", "replay.heartbeat_seconds",
    "replay.worker_max_leases", "replay.collect_timeout_s", "task.reward_timeout_s",
    "task.reward_workers", "eval", "launch",
)


def path(workdir: str) -> str:
    from rlax_tpu.run_meta import local_dir

    return os.path.join(local_dir(workdir), FILENAME)


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolved(config: ml_collections.ConfigDict) -> dict:
    """The config as JSON-able data (tuples become lists, as they come back from the file)."""
    return json.loads(json.dumps(config.to_dict()))


def may_change(field: str) -> bool:
    return any(field == f or field.startswith(f + ".") for f in MAY_CHANGE)


def differences(stored: dict, config: ml_collections.ConfigDict) -> dict[str, tuple[object, object]]:
    """field -> (stored value, this config's value) for every field that differs (a field one side
    lacks counts with value None)."""
    old, new = _flat(stored), _flat(resolved(config))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def check(config: ml_collections.ConfigDict, workdir: str, *, write: bool) -> None:
    """Compares ``config`` with the run's stored config (if there is one); ConfigError naming the
    fields that may not change. ``write`` (the trainer) stores ``config`` as the run's config."""
    file = path(workdir)
    if os.path.isfile(file):
        with open(file) as f:
            stored = json.load(f)
        diff = differences(stored, config)
        # A field the stored file lacks was added to the code since: no value to compare with.
        bad = {k: v for k, v in diff.items() if not may_change(k) and k in _flat(stored)}
        if bad:
            listed = "; ".join(f"{k}: {old!r} in the run, {new!r} now" for k, (old, new) in bad.items())
            raise ConfigError(", ".join(bad), f"differ from the run's config in {file} ({listed}). A resumed run "
                              f"may change only {', '.join(MAY_CHANGE)}; use a fresh workdir for another run")
        if diff:
            log.info("resuming with changed fields: %s", ", ".join(f"{k}={new!r}" for k, (_, new) in diff.items()))
    if write:
        os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
        tmp = f"{file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(resolved(config), f, indent=1, sort_keys=True)
        os.replace(tmp, file)  # a reader never sees half a file


def read(workdir: str) -> dict | None:
    """The run's stored config, or None."""
    file = path(workdir)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)
