"""Trainer: python -m trainer.main --config=configs/X.py[:arg] --workdir=DIR [--multihost].

Resumes from the newest complete checkpoint in --workdir; on a fresh workdir it trains the
tokenizer (if configured), warm-starts with SFT, then runs RL. Exit 0 on completion or after a
SIGTERM/SIGINT with a checkpoint of the current step.

Multi-host: on a TPU pod ``--multihost`` (or config.trainer.multihost) calls
``jax.distributed.initialize()``, which finds its peers by itself. Elsewhere (several processes
on CPU or GPU hosts, or a test on one machine) pass ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` to every process; on CPU the cross-process collectives then
use ``--cpu_collectives`` (gloo).
"""

from __future__ import annotations

from absl import app, flags

from rlax_tpu import logs
from rlax_tpu.config import cli

_CONFIG, _WORKDIR = cli.define_flags("Run directory (checkpoints, metrics, config.json, default store).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "host:port of process 0's coordinator (non-TPU multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of trainer processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in [0, num_processes).")
_CPU_COLLECTIVES = flags.DEFINE_enum("cpu_collectives", "gloo", ["gloo", "mpi"],
                                     "Cross-process collectives on the CPU backend.")


def init_distributed(multihost: bool) -> None:
    """Joins the JAX processes of a multi-host trainer (no-op for a single process)."""
    import jax

    if _COORDINATOR.value:
        if _NUM_PROCESSES.value < 1 or not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
            raise app.UsageError(f"--coordinator_address needs --num_processes >= 1 and --process_id in "
                                 f"[0, num_processes), got {_NUM_PROCESSES.value} and {_PROCESS_ID.value}")
        # Must be set before the backend starts: without it CPU computations cannot span processes.
        jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif multihost:
        jax.distributed.initialize()


def main(argv) -> None:
    del argv
    logs.setup()
    from rlax_tpu.config import ConfigError

    config = cli.start(_CONFIG, _WORKDIR, run_config="write")
    init_distributed(_MULTIHOST.value or config.trainer.multihost)
    from trainer.run import run

    try:
        run(config, _WORKDIR.value)
    except ConfigError as e:  # found at start-up (e.g. the batch does not divide the mesh)
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main)
