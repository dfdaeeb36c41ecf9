"""Host-side batch building: rollout groups and SFT traces -> fixed-shape numpy arrays.

Every batch has the same shape ([rows, seq_len], seq_len = config.inference.max_seq_len), so the
compiled steps never recompile. Row layout: the prompt then the completion, right-padded;
``targets[t] = tokens[t + 1]``; ``mask`` marks the positions whose target is a completion token
(RL) or an answer token (SFT), so prompt tokens never carry loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trainer.replay_controller import Admitted

TRUNCATED = ("length", "cache")  # finish reasons of completions cut before they ended


class BatchError(ValueError):
    """A rollout or trace that does not fit the batch (the message names it)."""


def _empty(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.zeros((rows, seq_len), np.int32),
        "targets": np.zeros((rows, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "mask": np.zeros((rows, seq_len), bool),
    }


def _put_row(b: dict, i: int, prompt: Sequence[int], answer: Sequence[int], where: str) -> tuple[int, int]:
    seq_len = b["tokens"].shape[1]
    p, n = len(prompt), len(answer)
    if p + n > seq_len:
        raise BatchError(f"{where}: prompt {p} + completion {n} tokens exceed seq_len {seq_len} "
                         "(config.inference.max_seq_len)")
    if p == 0:
        raise BatchError(f"{where}: empty prompt")
    seq = np.concatenate([np.asarray(prompt, np.int32), np.asarray(answer, np.int32)])
    b["tokens"][i, : p + n] = seq
    b["targets"][i, : p + n - 1] = seq[1:]
    b["segment_ids"][i, : p + n] = 1
    b["mask"][i, p - 1 : p + n - 1] = True
    return p, n


def rl_batch(groups: Sequence[Admitted], seq_len: int) -> dict[str, np.ndarray]:
    """One row per sample, groups contiguous and in the given order."""
    b = empty_rl_batch(sum(len(a.group.samples) for a in groups), seq_len)
    i = 0
    for g, a in enumerate(groups):
        for j, s in enumerate(a.group.samples):
            where = f"rollout {a.task.task_id} sample {j}"
            p, n = _put_row(b, i, a.task.prompt_tokens, s.tokens, where)
            if len(s.logprobs) != n:
                raise BatchError(f"{where}: {len(s.logprobs)} log-probs for {n} tokens")
            b["behavior_logp"][i, p - 1 : p + n - 1] = s.logprobs
            b["rewards"][i] = s.reward
            b["group_ids"][i] = g
            b["truncated"][i] = s.finish_reason in TRUNCATED
            b["lengths"][i] = n
            b["weights_steps"][i] = s.weights_step
            i += 1
    return b


def empty_rl_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """A batch of the right shapes and dtypes (multi-host: the template process 0 broadcasts into)."""
    b = _empty(rows, seq_len)
    b.update(behavior_logp=np.zeros((rows, seq_len), np.float32), rewards=np.zeros((rows,), np.float32),
             group_ids=np.zeros((rows,), np.int32), truncated=np.zeros((rows,), bool),
             lengths=np.zeros((rows,), np.int32), sample_mask=np.ones((rows,), bool),
             weights_steps=np.zeros((rows,), np.int32))
    return b


def sft_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int) -> dict[str, np.ndarray]:
    """(prompt tokens, answer tokens incl. EOS) pairs; answers longer than the row are cut."""
    b = _empty(len(pairs), seq_len)
    for i, (prompt, answer) in enumerate(pairs):
        room = seq_len - len(prompt)
        if room < 1:
            raise BatchError(f"SFT trace {i}: prompt of {len(prompt)} tokens leaves no room in seq_len "
                             f"{seq_len} (config.sft.max_len)")
        _put_row(b, i, prompt, list(answer)[:room], f"SFT trace {i}")
    return b
