"""The replay queue's wire format, shared by its two halves.

Tasks go out from the trainer's controller (``trainer.replay_controller``) and rollout groups
come back from inference workers (``inference_worker.replay_client``), as msgpack records under
the key layout in ``rlax_tpu.store_layout``, in the run's store. Durable (every record lives in the kvstore),
bounded (admission control), leased (a dead worker's task is taken over after its lease
expires); compare-and-swap is the only synchronization. See docs/replay.md.
"""

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

__all__ = [
    "SCHEMA_VERSION", "RecordError", "RolloutGroup", "Sample", "Task", "decode_rollout", "decode_task",
    "encode_rollout", "encode_task", "task_digest",
]
