"""Inference worker: python -m inference_worker.main --config=configs/X.py[:arg] --workdir=DIR.

Pulls weights from the run's param server, leases tasks from the replay queue, generates with
the engine, scores with the task's verifier and writes rollout groups back. Stateless: run as
many as you like, kill any of them at any time.
"""

from __future__ import annotations

import os
import socket

from absl import app, flags

from rlax_tpu import logs
from rlax_tpu.config import cli

_CONFIG, _WORKDIR = cli.define_flags("Run directory; the store defaults to <workdir>/store/.")
_WORKER_ID = flags.DEFINE_string("worker_id", "", "Unique worker name (default: <host>-<pid>).")
_MAX_GROUPS = flags.DEFINE_integer("max_groups", 0, "Exit after this many rollout groups (0 = never).")


def main(argv) -> None:
    del argv
    logs.setup()
    config = cli.start(_CONFIG, _WORKDIR, run_config="check")
    worker_id = _WORKER_ID.value or f"{socket.gethostname()}-{os.getpid()}"
    from inference_worker.worker import run

    run(config, _WORKDIR.value, worker_id, _MAX_GROUPS.value)


if __name__ == "__main__":
    app.run(main)
