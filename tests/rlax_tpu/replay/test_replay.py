"""Replay queue, in process: records, admission, staleness, acks, corrupt input."""

import dataclasses
import logging
import time

import msgpack
import numpy as np
import pytest

from inference_worker.replay_client import ReplayWorker
from rlax_tpu import store_layout as keys
from rlax_tpu.config import ConfigError, finalize, get_base_config
from rlax_tpu.fencing import FencedError, acquire_epoch
from rlax_tpu.kvstore import KVStore
from rlax_tpu.replay import (
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
from tests.helpers.fake_worker import fake_samples
from trainer.replay_controller import QueueFull, ReplayController


@pytest.fixture(params=["memory", "file"])
def kv(request, tmp_path):
    url = "memory://" if request.param == "memory" else f"file://{tmp_path}/store"
    return KVStore.open(url)


def _task(tid="000000000007"):
    return Task(tid, "p7", np.arange(5, dtype=np.int32), {"reward": "arith", "answer": "12"}, 4, 99, 3)


def _group(tid="000000000007", steps=(3, 4), rewards=(0.0, 1.0)):
    samples = tuple(
        Sample(np.arange(6, dtype=np.int32) + i, -np.linspace(0, 1, 6, dtype=np.float32), v, r,
               {"correct": r}, "stop")
        for i, (v, r) in enumerate(zip(steps, rewards, strict=True)))
    return RolloutGroup(tid, samples, "w0", {"generate_s": 0.5}, "abcd")


def _issue(ctl, n, weights_step=0, n_samples=2, mixed=True):
    spec = {"mixed_rewards": mixed}
    return [ctl.issue(f"p{i}", np.arange(3) + i, spec, n_samples, weights_step) for i in range(n)]


def _work(worker, weights_step=0, n=100):
    done = 0
    for lease in worker.lease(n):
        worker.submit(lease, fake_samples(lease.task, weights_step, 4))
        done += 1
    return done


# ------------------------------------------------------------------------------------ records


def test_records_round_trip():
    t = _task()
    t2 = decode_task(encode_task(t))
    assert t2.prompt_tokens.dtype == np.int32 and np.array_equal(t2.prompt_tokens, t.prompt_tokens)
    assert (t2.task_id, t2.spec, t2.n_samples, t2.seed, t2.weights_step) == \
        (t.task_id, t.spec, t.n_samples, t.seed, t.weights_step)
    assert encode_task(t) == encode_task(t2)  # deterministic: digests are stable
    g = _group()
    g2 = decode_rollout(encode_rollout(g))
    assert g2.task_id == g.task_id and g2.worker_id == "w0" and g2.task_digest == "abcd"
    assert g2.min_weights_step == 3 and list(g2.rewards) == [0.0, 1.0]
    for a, b in zip(g.samples, g2.samples, strict=True):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.logprobs, b.logprobs)
        assert b.logprobs.dtype == np.float32 and (a.weights_step, a.finish_reason) == (b.weights_step, b.finish_reason)
    # compact: raw bytes, not lists (8 samples x 1k tokens is ~72 KiB, not ~100s of KiB)
    big = RolloutGroup("000000000001", tuple(
        Sample(np.zeros(1024, np.int32), np.zeros(1024, np.float32), 0, 0.0, {}, "stop")
        for _ in range(8)), "w", {})
    assert len(encode_rollout(big)) < 8 * 1024 * 9 + 2000


def _episode_group():
    mask = np.array([1, 1, 0, 0, 0, 1, 1], np.uint8)  # model, environment, model tokens
    logp = np.where(mask == 1, -0.5, 0.0).astype(np.float32)
    s = Sample(np.arange(7, dtype=np.int32), logp, 2, 1.0, {"turns": 2, "tool_calls": 1}, "eos", mask)
    return RolloutGroup("000000000009", (s,), "w0", {}, "abcd")


def test_schema_3_round_trips_the_loss_mask():
    g = _episode_group()
    (s,) = decode_rollout(encode_rollout(g)).samples
    assert s.loss_mask.dtype == np.uint8 and s.loss_mask.tolist() == [1, 1, 0, 0, 0, 1, 1]
    assert s.reward_details == {"turns": 2, "tool_calls": 1}
    assert msgpack.unpackb(encode_rollout(g), raw=False)["schema"] == SCHEMA_VERSION == 3
    # a completion (no mask given) is every token the model's
    assert _group().samples[0].loss_mask.tolist() == [1] * 6


def test_schema_2_records_of_a_resumed_run_decode_with_an_all_ones_mask():
    d = msgpack.unpackb(encode_rollout(_episode_group()), raw=False)
    d["schema"] = 2
    del d["samples"][0]["loss_mask"]
    (s,) = decode_rollout(msgpack.packb(d, use_bin_type=True)).samples
    assert s.loss_mask.tolist() == [1] * 7
    t = decode_task(_mutate(encode_task(_task()), schema=2))
    assert task_digest(t) == task_digest(_task())  # digests do not change with the schema


@pytest.mark.parametrize("change, match", [
    (lambda s: s.pop("loss_mask"), "'loss_mask' is missing"),
    (lambda s: s["loss_mask"].update(shape=[6], data=b"\x01" * 6), "loss_mask .* differ"),
    (lambda s: s["loss_mask"].update(data=b"\x02" * 7), "loss_mask must hold 0"),
    (lambda s: s.update(loss_mask=[1] * 7), "loss_mask: expected an encoded array"),
])
def test_bad_loss_masks_raise_record_error_naming_the_field(change, match):
    d = msgpack.unpackb(encode_rollout(_episode_group()), raw=False)
    change(d["samples"][0])
    with pytest.raises(RecordError, match=match):
        decode_rollout(msgpack.packb(d, use_bin_type=True))
    bad = dataclasses.replace(_episode_group().samples[0], loss_mask=np.array([1, 0, 2, 0, 0, 1, 1]))
    with pytest.raises(RecordError, match="loss_mask"):
        encode_rollout(RolloutGroup("000000000009", (bad,), "w0", {}))


def _mutate(raw, **fields):
    d = msgpack.unpackb(raw, raw=False)
    d.update(fields)
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize("bad", [
    lambda raw: raw[: len(raw) // 2],  # truncated msgpack
    lambda raw: b"\xc1garbage",
    lambda raw: msgpack.packb([1, 2, 3]),
    lambda raw: _mutate(raw, schema=SCHEMA_VERSION + 1),  # newer writer
    lambda raw: _mutate(raw, kind="rlax.task"),  # foreign record
    lambda raw: _mutate(raw, worker_id=7),  # wrong type
    lambda raw: _mutate(raw, samples=[]),
    lambda raw: _mutate(raw, samples=[{"tokens": 1}]),
])
def test_bad_rollout_records_raise_record_error(bad):
    with pytest.raises(RecordError):
        decode_rollout(bad(encode_rollout(_group())))


def test_bad_array_shapes_and_task_fields_raise():
    raw = encode_rollout(_group())
    d = msgpack.unpackb(raw, raw=False)
    d["samples"][0]["logprobs"]["shape"] = [5]  # bytes no longer match the shape
    with pytest.raises(RecordError, match="bytes do not hold"):
        decode_rollout(msgpack.packb(d, use_bin_type=True))
    d = msgpack.unpackb(raw, raw=False)
    d["samples"][0]["tokens"]["dtype"] = "object"
    with pytest.raises(RecordError, match="dtype"):
        decode_rollout(msgpack.packb(d, use_bin_type=True))
    with pytest.raises(RecordError, match="n_samples"):
        decode_task(_mutate(encode_task(_task()), n_samples=0))
    with pytest.raises(RecordError, match="seed"):
        decode_task(_mutate(encode_task(_task()), seed="1"))


# ------------------------------------------------------------------------------------ controller


def test_admission_control_caps_tasks_in_flight(kv):
    ctl = ReplayController(kv, max_in_flight=3, max_staleness=1)
    _issue(ctl, 3)
    assert ctl.free_slots() == 0
    with pytest.raises(QueueFull):
        _issue(ctl, 1)
    assert _work(ReplayWorker(kv, "w0", lease_seconds=5, max_leases=4, heartbeat_seconds=10.0)) == 3
    res = ctl.poll(step=0, limit=2)
    assert len(res.admitted) == 2 and ctl.free_slots() == 2 and ctl.in_flight == 1
    assert [a.task.task_id for a in res.admitted] == [keys.task_id(0), keys.task_id(1)]  # oldest first
    assert len(ctl.poll(step=0).admitted) == 1 and ctl.poll(step=0).admitted == []  # once only


def test_max_in_flight_derived_from_config(kv):
    config = get_base_config()
    config.trainer.batch_size, config.rl.max_staleness = 4, 2
    ctl = ReplayController.from_config(kv, finalize(config))
    assert ctl.max_in_flight == 12
    config = get_base_config()
    config.replay.lease_seconds = 0
    with pytest.raises(ConfigError, match=r"replay\.lease_seconds"):
        finalize(config)


def test_staleness_bound_uses_the_oldest_sample(kv):
    ctl = ReplayController(kv, max_in_flight=8, max_staleness=1)
    worker = ReplayWorker(kv, "w0", lease_seconds=5, max_leases=4, heartbeat_seconds=10.0)
    _issue(ctl, 2)
    assert _work(worker, weights_step=3) == 2
    res = ctl.poll(step=5)  # 5 - 3 = 2 > 1: both dropped, their tasks go back to the workers
    assert res.admitted == [] and len(res.dropped_stale) == 2 and ctl.counters["dropped_stale"] == 2
    assert ctl.in_flight == 2 and kv.list(keys.ROLLOUTS) == []
    assert _work(worker, weights_step=4) == 2
    res = ctl.poll(step=5)
    assert [a.staleness for a in res.admitted] == [1, 1] and ctl.counters["admitted"] == 2


def test_ack_deletes_only_records_covered_by_a_committed_checkpoint(kv):
    ctl = ReplayController(kv, max_in_flight=8, max_staleness=0)
    worker = ReplayWorker(kv, "w0", lease_seconds=5, max_leases=4, heartbeat_seconds=10.0)
    _issue(ctl, 4)
    _work(worker)
    ctl.poll(step=0, limit=2)
    saved = ctl.state_dict()  # checkpoint C holds 2 consumed
    ctl.poll(step=0)  # 2 more consumed after C
    assert len(kv.list(keys.ROLLOUTS)) == 4  # nothing deleted before the checkpoint commits
    assert ctl.ack(saved) == 2
    assert kv.list(keys.TASKS) == [keys.TASKS + keys.task_id(i) for i in (2, 3)]
    assert ctl.state_dict()["consumed"] == [keys.task_id(2), keys.task_id(3)]


def test_corrupt_and_foreign_rollouts_are_counted_skipped_and_redone(kv, caplog):
    ctl = ReplayController(kv, max_in_flight=8, max_staleness=1)
    tasks = _issue(ctl, 3)
    kv.put(keys.ROLLOUTS + tasks[0].task_id, b"\x93\x01")  # truncated msgpack
    kv.put(keys.ROLLOUTS + tasks[1].task_id, _mutate(encode_rollout(_group(tasks[1].task_id)), schema=9))
    kv.put(keys.ROLLOUTS + "not-a-task", b"junk")  # foreign key: ignored
    with caplog.at_level(logging.WARNING):
        res = ctl.poll(step=0)
    assert res.admitted == [] and sorted(res.invalid) == [tasks[0].task_id, tasks[1].task_id]
    assert ctl.counters["corrupt"] == 2 and "schema version 9" in caplog.text
    # the corrupt rollouts were removed, so a worker does those tasks again
    assert _work(ReplayWorker(kv, "w0", lease_seconds=5, max_leases=4, heartbeat_seconds=10.0)) == 3
    assert len(ctl.poll(step=0).admitted) == 3


def test_corrupt_task_and_lease_records_do_not_stop_a_worker(kv, caplog):
    ctl = ReplayController(kv, max_in_flight=8, max_staleness=1)
    tasks = _issue(ctl, 3)
    kv.put(keys.TASKS + tasks[0].task_id, encode_task(_task())[:-3])
    kv.put(keys.LEASES + tasks[1].task_id, b"{not json")
    worker = ReplayWorker(kv, "w0", lease_seconds=5, max_leases=4, heartbeat_seconds=10.0)
    with caplog.at_level(logging.WARNING):
        got = worker.lease(5)
    assert [lease.task_id for lease in got] == [tasks[2].task_id, tasks[1].task_id]
    assert worker.counters["corrupt_tasks"] == 1 and worker.counters["corrupt_leases"] == 1
    assert worker.lease(5) == []  # the corrupt task is remembered, not retried every poll


def test_late_write_after_lease_expiry_is_ignored(kv):
    ctl = ReplayController(kv, max_in_flight=4, max_staleness=1)
    (task,) = _issue(ctl, 1)
    slow = ReplayWorker(kv, "slow", lease_seconds=0.2, max_leases=4, heartbeat_seconds=10.0)
    fast = ReplayWorker(kv, "fast", lease_seconds=5, max_leases=4, heartbeat_seconds=10.0)
    (lease,) = slow.lease(1)
    time.sleep(0.3)  # slow's lease expires without renewal
    (taken,) = fast.lease(1)
    assert taken.task_id == task.task_id and fast.counters["taken_over"] == 1
    assert not slow.renew(lease) and lease.lost
    assert fast.submit(taken, fake_samples(taken.task, 0, 4))
    assert not slow.submit(lease, fake_samples(lease.task, 0, 4))  # first complete result wins
    assert slow.counters["late_writes_ignored"] == 1
    res = ctl.poll(step=0)
    assert [a.group.worker_id for a in res.admitted] == ["fast"] and kv.list(keys.LEASES) == []
    assert ctl.poll(step=0).admitted == []


def test_late_write_after_ack_is_garbage_collected(kv):
    ctl = ReplayController(kv, max_in_flight=4, max_staleness=1)
    _issue(ctl, 1)
    late = ReplayWorker(kv, "late", lease_seconds=0.1, max_leases=4, heartbeat_seconds=10.0)
    (lease,) = late.lease(1)
    time.sleep(0.15)
    _work(ReplayWorker(kv, "w1", lease_seconds=5, max_leases=4, heartbeat_seconds=10.0))
    ctl.poll(step=0)
    ctl.ack(ctl.state_dict())
    assert kv.list("") == []
    assert late.submit(lease, fake_samples(lease.task, 0, 4))  # lands after everything was deleted
    assert ctl.poll(step=0).admitted == [] and kv.list(keys.ROLLOUTS) == []  # orphan removed


def test_reissue_after_restore_reuses_identical_tasks_and_rejects_changed_ones(kv):
    ctl = ReplayController(kv, max_in_flight=8, max_staleness=1)
    saved = ctl.state_dict()
    _issue(ctl, 2)
    _work(ReplayWorker(kv, "w0", lease_seconds=5, max_leases=4, heartbeat_seconds=10.0))
    # restart from the empty state: the same prompts come again for id 0, a different one for id 1
    ctl2 = ReplayController(kv, max_in_flight=8, max_staleness=1, state=saved)
    ctl2.issue("p0", np.arange(3), {"mixed_rewards": True}, 2, 0)
    ctl2.issue("other", np.arange(7), {"mixed_rewards": True}, 2, 0)
    assert ctl2.counters["reissued_same"] == 1 and ctl2.counters["reissued_changed"] == 1
    res = ctl2.poll(step=0)
    assert [a.task.prompt_id for a in res.admitted] == ["p0"] and ctl2.counters["mismatched"] == 1
    _work(ReplayWorker(kv, "w1", lease_seconds=5, max_leases=4, heartbeat_seconds=10.0))
    assert [a.task.prompt_id for a in ctl2.poll(step=0).admitted] == ["other"]


def test_fenced_controller_cannot_delete(kv):
    epoch = acquire_epoch(kv)
    ctl = ReplayController(kv, max_in_flight=4, max_staleness=1, epoch=epoch)
    _issue(ctl, 1)
    _work(ReplayWorker(kv, "w0", lease_seconds=5, max_leases=4, heartbeat_seconds=10.0))
    ctl.poll(step=0)
    acquire_epoch(kv)  # a newer trainer starts
    with pytest.raises(FencedError):
        ctl.ack(ctl.state_dict())
    with pytest.raises(FencedError):
        _issue(ctl, 1)
    assert len(kv.list(keys.ROLLOUTS)) == 1


def test_bad_controller_state_is_refused(kv):
    with pytest.raises(ValueError, match="state is invalid"):
        ReplayController(kv, max_in_flight=4, max_staleness=1, state={"schema": 1, "issued": 3})


def test_heartbeat_and_release(kv):
    ctl = ReplayController(kv, max_in_flight=4, max_staleness=1)
    _issue(ctl, 2)
    worker = ReplayWorker(kv, "w0", lease_seconds=5, max_leases=4, heartbeat_seconds=10.0)
    worker.weights_step = 7
    assert len(worker.lease(2)) == 2 and len(kv.list(keys.LEASES)) == 2
    worker.heartbeat(note="x")
    beat = keys.Heartbeat.decode(kv.get(keys.WORKERS + "w0"))  # the one parser every reader uses
    assert beat.worker == "w0" and beat.weights_step == 7 and len(beat.leases) == 2 and beat.tasks_done == 0
    assert beat.extra == {"note": "x"} and beat.alive(heartbeat_s=10.0) and not beat.alive(10.0, now=beat.time + 31)
    assert keys.Heartbeat.decode(beat.encode()) == beat
    worker.heartbeat(state="stopped")
    assert not keys.Heartbeat.decode(kv.get(keys.WORKERS + "w0")).alive(heartbeat_s=10.0)
    with pytest.raises(keys.HeartbeatError):
        keys.Heartbeat.decode(b"\x00not json")
    with pytest.raises(keys.HeartbeatError):
        keys.Heartbeat.decode(b'{"worker": "w", "time": "soon"}')
    assert worker.release_all() == 2 and kv.list(keys.LEASES) == []
