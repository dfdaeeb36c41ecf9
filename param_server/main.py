"""The param-server janitor and status process.

    python -m param_server.main --config=configs/param_server_status.py --workdir=DIR [--mode=status]
    python -m param_server.main --config=... --workdir=DIR --mode=janitor   # gc every interval

It relays no bytes: trainer and workers talk to the store directly. The janitor runs garbage
collection (``config.store.gc_keep``, pins, orphaned attempts, expired pins) periodically, of
the default tree and of a LoRA run's ``adapter`` tree (its ``base`` tree is never collected).
"""

from __future__ import annotations

import json
import logging
import time

from absl import app, flags

from param_server import status
from param_server.adapters import ADAPTER_TREE
from param_server.store import ParamStore
from rlax_tpu.config import cli

_CONFIG, _WORKDIR = cli.define_flags("Run directory; the store defaults to <workdir>/store/.")
_MODE = flags.DEFINE_enum("mode", "status", ["status", "janitor"],
                          "status: print once and exit; janitor: gc and print status every interval.")
_JSON = flags.DEFINE_bool("json", False, "Print the status as JSON instead of text.")
_ITERATIONS = flags.DEFINE_integer("iterations", 0, "Janitor passes before exiting (0 = forever).")

log = logging.getLogger(__name__)


def run(config, workdir: str | None, mode: str = "status", as_json: bool = False,
        iterations: int = 0) -> None:
    store = ParamStore.open(config.store.url, workdir, config=config)
    passes = 0
    while True:
        if mode == "janitor":
            report = store.gc()
            print(json.dumps({"gc": report}), flush=True)
            adapters = store.tree(ADAPTER_TREE)  # a LoRA run's policy versions (its base stays)
            if adapters.latest_version() is not None:
                print(json.dumps({"gc": {ADAPTER_TREE: adapters.gc()}}), flush=True)
        snap = status.collect(store)
        text = json.dumps(snap, default=str) if as_json else \
            status.render(snap, heartbeat_s=float(config.replay.heartbeat_seconds))
        print(text, flush=True)
        passes += 1
        if mode == "status" or (iterations and passes >= iterations):
            return
        time.sleep(config.store.janitor_interval_s)


def main(argv) -> None:
    del argv
    # Only config.store is read, so the status config may be another than the run's own.
    config = cli.start(_CONFIG, _WORKDIR, run_config="ignore")
    run(config, _WORKDIR.value, _MODE.value, _JSON.value, _ITERATIONS.value)


if __name__ == "__main__":
    app.run(main)
