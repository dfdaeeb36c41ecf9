"""Replay records: plain data (msgpack with a schema version) exchanged through the store.

A ``Task`` goes out from the controller (``tasks/<task_id>``); a ``RolloutGroup`` comes back from
a worker (``rollouts/<task_id>``). numpy arrays travel as raw bytes + dtype + shape, never as
Python lists or pickles. ``decode_*`` validates the schema version, every field's type and every
array's shape and raises ``RecordError`` naming the problem; callers log, count and skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import msgpack
import numpy as np

SCHEMA_VERSION = 3
# Older versions still decoded (an old run resumed): schema 2 samples have no loss mask (all ones).
READABLE_SCHEMAS = (2, 3)
# Task digests are taken over the task as schema 2 encoded it (tasks did not change in 3), so a
# run resumed across the upgrade still recognizes the tasks it issued.
_DIGEST_SCHEMA = 2
TASK_KIND = "rlax.task"
ROLLOUT_KIND = "rlax.rollout_group"
# Only these dtypes cross the wire (tokens and log-probs); anything else is a foreign record.
_DTYPES = ("int32", "int64", "float32", "float64", "bfloat16", "float16", "uint8")


class RecordError(ValueError):
    """A record could not be decoded: wrong schema version, truncated bytes, wrong types or shapes."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One prompt to be sampled ``n_samples`` times by a worker."""

    task_id: str  # zero-padded, sortable (see keys.task_id)
    prompt_id: str  # stable id of the prompt in the dataset (for dedup / difficulty tracking)
    prompt_tokens: np.ndarray  # [P] int32
    spec: dict  # task / reward spec: plain JSON-able data (e.g. {"reward": "arith", "answer": "12"})
    n_samples: int
    seed: int
    weights_step: int  # the trainer step whose published weights (or newer) must generate it


@dataclasses.dataclass(frozen=True)
class Sample:
    """One episode of a task (a single completion for a one-step task).

    tokens, logprobs and loss_mask are aligned over everything after the task's prompt: the
    model's tokens (loss mask 1, behavior log-probs) and the environment's turns between them
    (loss mask 0, log-prob 0). loss_mask None means every token is the model's (a completion);
    an all-zero mask leaves the sample out of training (an infrastructure failure).
    """

    tokens: np.ndarray  # [T] int32, the episode after the prompt (the prompt is in the Task)
    logprobs: np.ndarray  # [T] float32 behavior log-probs from the engine (0 on environment tokens)
    weights_step: int  # trainer step of the weights that generated this sample
    reward: float
    reward_details: dict  # plain JSON-able data (e.g. {"format": 1.0, "correct": 0.0}, episode counters)
    finish_reason: str  # "stop" | "length" | ...
    loss_mask: np.ndarray | None = None  # [T] uint8: 1 model token, 0 environment token

    def __post_init__(self):
        if self.loss_mask is None:
            object.__setattr__(self, "loss_mask", np.ones(np.shape(self.tokens), np.uint8))


@dataclasses.dataclass(frozen=True)
class RolloutGroup:
    """A task's finished samples, written once under ``rollouts/<task_id>``."""

    task_id: str
    samples: tuple[Sample, ...]
    worker_id: str
    timings: dict  # plain JSON-able floats, e.g. {"leased_at":..., "generate_s":..., "done_at":...}
    task_digest: str = ""  # task_digest() of the task it answers; guards against re-issued ids

    @property
    def min_weights_step(self) -> int:
        """The oldest weights step among the samples: what staleness is judged by."""
        return min(s.weights_step for s in self.samples)

    @property
    def rewards(self) -> np.ndarray:
        return np.asarray([s.reward for s in self.samples], np.float32)


def task_digest(task: Task) -> str:
    """Short digest of what a task asks for, carried by its rollout group.

    The weights step is left out: a task re-issued after a restart with the same prompt, spec
    and seed but a newer weights step is the same work, and its rollout stays valid.
    """
    raw = _encode_task(dataclasses.replace(task, weights_step=0), _DIGEST_SCHEMA)
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


# ----------------------------------------------------------------------------- arrays


def _pack_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    if a.dtype.name not in _DTYPES:
        raise RecordError(f"array dtype {a.dtype} is not one of {_DTYPES}")
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}


def _unpack_array(d: Any, where: str, ndim: int) -> np.ndarray:
    if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"}:
        raise RecordError(f"{where}: expected an encoded array, got {type(d).__name__}")
    dtype, shape, data = d["dtype"], d["shape"], d["data"]
    if dtype not in _DTYPES:
        raise RecordError(f"{where}: dtype {dtype!r} is not one of {_DTYPES}")
    if not (isinstance(shape, list) and len(shape) == ndim
            and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise RecordError(f"{where}: shape {shape!r} is not a {ndim}-d shape")
    if not isinstance(data, bytes):
        raise RecordError(f"{where}: data is {type(data).__name__}, not bytes")
    if dtype == "bfloat16":
        import ml_dtypes  # noqa: PLC0415 (only needed for bf16 log-probs)

        np_dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        np_dtype = np.dtype(dtype)
    if len(data) != int(np.prod(shape)) * np_dtype.itemsize:
        raise RecordError(f"{where}: {len(data)} bytes do not hold {dtype}{shape}")
    return np.frombuffer(data, np_dtype).reshape(shape)


# ----------------------------------------------------------------------------- field checks


def _field(d: dict, name: str, types: type | tuple, where: str) -> Any:
    if name not in d:
        raise RecordError(f"{where}: field {name!r} is missing")
    value = d[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RecordError(f"{where}: field {name!r} is a bool, expected {types}")
    if not isinstance(value, types):
        raise RecordError(f"{where}: field {name!r} is {type(value).__name__}, expected {types}")
    return value


def _header(raw: bytes, kind: str) -> dict:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise RecordError(f"{kind}: record is {type(raw).__name__}, not bytes")
    try:
        d = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for truncated / garbage input
        raise RecordError(f"{kind}: not valid msgpack ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise RecordError(f"{kind}: top level is {type(d).__name__}, not a map")
    if d.get("kind") != kind:
        raise RecordError(f"{kind}: foreign record of kind {d.get('kind')!r}")
    if d.get("schema") not in READABLE_SCHEMAS:
        raise RecordError(f"{kind}: schema version {d.get('schema')!r}, expected one of {READABLE_SCHEMAS}")
    return d


def _pack(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


# ----------------------------------------------------------------------------- Task


def encode_task(t: Task) -> bytes:
    """Deterministic bytes: the same task always encodes (and digests) the same."""
    return _encode_task(t, SCHEMA_VERSION)


def _encode_task(t: Task, schema: int) -> bytes:
    return _pack({
        "kind": TASK_KIND, "schema": schema, "task_id": t.task_id, "prompt_id": t.prompt_id,
        "prompt_tokens": _pack_array(np.asarray(t.prompt_tokens, np.int32)),
        "spec": t.spec, "n_samples": int(t.n_samples), "seed": int(t.seed),
        "weights_step": int(t.weights_step),
    })


def decode_task(raw: bytes) -> Task:
    d = _header(raw, TASK_KIND)
    w = "task"
    tid = _field(d, "task_id", str, w)
    w = f"task {tid}"
    n = _field(d, "n_samples", int, w)
    if n <= 0:
        raise RecordError(f"{w}: n_samples={n} must be positive")
    return Task(
        task_id=tid, prompt_id=_field(d, "prompt_id", str, w),
        prompt_tokens=_unpack_array(d.get("prompt_tokens"), f"{w}.prompt_tokens", 1),
        spec=_field(d, "spec", dict, w), n_samples=n, seed=_field(d, "seed", int, w),
        weights_step=_field(d, "weights_step", int, w),
    )


# ----------------------------------------------------------------------------- RolloutGroup


def _check_mask(mask: np.ndarray, tokens: np.ndarray, where: str) -> np.ndarray:
    if mask.shape != tokens.shape:
        raise RecordError(f"{where}: loss_mask {mask.shape} and tokens {tokens.shape} differ")
    if mask.dtype.kind not in "iub" or (mask.size and not np.isin(mask, (0, 1)).all()):
        raise RecordError(f"{where}: loss_mask must hold 0 (environment) and 1 (model) only, "
                          f"got dtype {mask.dtype} with values {np.unique(mask)[:8].tolist()}")
    return mask.astype(np.uint8, copy=False)


def encode_rollout(g: RolloutGroup) -> bytes:
    samples = []
    for i, s in enumerate(g.samples):
        tokens, logprobs = np.asarray(s.tokens), np.asarray(s.logprobs)
        if tokens.shape != logprobs.shape or tokens.ndim != 1:
            raise RecordError(f"rollout {g.task_id}: tokens {tokens.shape} vs logprobs {logprobs.shape}")
        mask = _check_mask(np.asarray(s.loss_mask), tokens, f"rollout {g.task_id}.samples[{i}]")
        samples.append({
            "tokens": _pack_array(tokens.astype(np.int32, copy=False)), "loss_mask": _pack_array(mask),
            "logprobs": _pack_array(logprobs), "weights_step": int(s.weights_step),
            "reward": float(s.reward), "reward_details": s.reward_details,
            "finish_reason": s.finish_reason,
        })
    return _pack({
        "kind": ROLLOUT_KIND, "schema": SCHEMA_VERSION, "task_id": g.task_id, "samples": samples,
        "worker_id": g.worker_id, "timings": g.timings, "task_digest": g.task_digest,
    })


def decode_rollout(raw: bytes) -> RolloutGroup:
    d = _header(raw, ROLLOUT_KIND)
    tid = _field(d, "task_id", str, "rollout")
    w = f"rollout {tid}"
    raw_samples = _field(d, "samples", list, w)
    if not raw_samples:
        raise RecordError(f"{w}: no samples")
    samples = []
    for i, s in enumerate(raw_samples):
        ws = f"{w}.samples[{i}]"
        if not isinstance(s, dict):
            raise RecordError(f"{ws}: is {type(s).__name__}, not a map")
        tokens = _unpack_array(s.get("tokens"), f"{ws}.tokens", 1)
        logprobs = _unpack_array(s.get("logprobs"), f"{ws}.logprobs", 1)
        if tokens.shape != logprobs.shape:
            raise RecordError(f"{ws}: tokens {tokens.shape} and logprobs {logprobs.shape} differ")
        if tokens.dtype.kind != "i" or logprobs.dtype.kind != "f" and logprobs.dtype.name != "bfloat16":
            raise RecordError(f"{ws}: tokens {tokens.dtype} / logprobs {logprobs.dtype} have wrong kinds")
        reward = _field(s, "reward", (int, float), ws)
        if d["schema"] == 2:  # completions only: every token the model's
            mask = np.ones(tokens.shape, np.uint8)
        else:
            if "loss_mask" not in s:
                raise RecordError(f"{ws}: field 'loss_mask' is missing")
            mask = _check_mask(_unpack_array(s["loss_mask"], f"{ws}.loss_mask", 1), tokens, ws)
        samples.append(Sample(
            tokens=tokens, logprobs=logprobs, weights_step=_field(s, "weights_step", int, ws),
            reward=float(reward), reward_details=_field(s, "reward_details", dict, ws),
            finish_reason=_field(s, "finish_reason", str, ws), loss_mask=mask,
        ))
    return RolloutGroup(
        task_id=tid, samples=tuple(samples), worker_id=_field(d, "worker_id", str, w),
        timings=_field(d, "timings", dict, w), task_digest=_field(d, "task_digest", str, w),
    )
