"""The replay queue: tasks out to inference workers, rollout groups back, over the run's store.

Durable (every record lives in the kvstore), bounded (admission control), leased (a dead
worker's task is taken over after its lease expires). Compare-and-swap is the only
synchronization. See docs/replay.md.
"""

from rlax_tpu.replay.controller import Admitted, PollResult, QueueFull, ReplayController
from rlax_tpu.replay.records import (
    SCHEMA_VERSION,
    RecordError,
    RolloutGroup,
    Sample,
    Task,
    decode_rollout,
    decode_task,
    encode_rollout,
    encode_task,
    task_digest,
)
from rlax_tpu.replay.sampling import ReuseBuffer, filter_zero_variance, is_zero_variance
from rlax_tpu.replay.worker import Lease, ReplayWorker, install_sigterm_handler

__all__ = [
    "SCHEMA_VERSION", "Admitted", "Lease", "PollResult", "QueueFull", "RecordError", "ReplayController",
    "ReplayWorker", "ReuseBuffer", "RolloutGroup", "Sample", "Task", "decode_rollout", "decode_task",
    "encode_rollout", "encode_task", "filter_zero_variance", "install_sigterm_handler",
    "is_zero_variance", "task_digest",
]
