"""Host-side batch building: rollout groups and SFT traces -> numpy arrays.

The per-sample view is one row per sample, [samples, seq_len] (seq_len =
config.inference.max_seq_len): the prompt then the episode (a completion, or model and
environment turns), right-padded; ``targets[t] = tokens[t + 1]``; ``mask`` marks the positions
whose target is a model token (RL: the sample's loss mask, so environment turns carry no loss) or
an answer token (SFT), so prompt tokens never carry loss. The loss, advantages and
metrics work on that view. The model's inputs (MODEL_KEYS) go through ``pack``: several samples
per row of config.trainer.pack_len tokens, each its own segment with positions from 0, and a
``pack_index`` that maps the packed rows' outputs back to the per-sample view.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trainer.replay_controller import Admitted

TRUNCATED = ("length", "cache")  # finish reasons of completions cut before they ended
MODEL_KEYS = ("tokens", "targets", "positions", "segment_ids")  # what pack() lays out in rows
MAX_ROW_BUCKETS = 8  # packed row counts are rounded up so a batch shape takes at most this many


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


def _put_row(b: dict, i: int, prompt: Sequence[int], answer: Sequence[int], where: str,
             loss_mask: np.ndarray | None = None) -> tuple[int, int]:
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
    b["mask"][i, p - 1 : p + n - 1] = True if loss_mask is None else np.asarray(loss_mask, bool)
    return p, n


def rl_batch(groups: Sequence[Admitted], seq_len: int) -> dict[str, np.ndarray]:
    """One row per sample, groups contiguous and in the given order. A row holds the prompt and
    the whole episode (sized by its length); the loss, advantages and metrics see only the
    model's tokens (``mask`` = the sample's loss mask). A sample with no model token to train on
    (masked for an infrastructure failure) is no valid row (``sample_mask``): it is left out of
    its group's statistics."""
    b = empty_rl_batch(sum(len(a.group.samples) for a in groups), seq_len)
    i = 0
    for g, a in enumerate(groups):
        for j, s in enumerate(a.group.samples):
            where = f"rollout {a.task.task_id} sample {j}"
            if len(s.loss_mask) != len(s.tokens):
                raise BatchError(f"{where}: a loss mask of {len(s.loss_mask)} for {len(s.tokens)} tokens")
            p, n = _put_row(b, i, a.task.prompt_tokens, s.tokens, where, s.loss_mask)
            if len(s.logprobs) != n:
                raise BatchError(f"{where}: {len(s.logprobs)} log-probs for {n} tokens")
            b["sample_mask"][i] = bool(np.any(s.loss_mask))
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


def sft_episode_batch(episodes: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int
                      ) -> dict[str, np.ndarray]:
    """(episode tokens, per-token loss mask: 1 on model tokens) pairs, one row each; an episode
    longer than the row is cut at seq_len."""
    b = _empty(len(episodes), seq_len)
    for i, (tokens, loss_mask) in enumerate(episodes):
        if len(tokens) != len(loss_mask):
            raise BatchError(f"SFT episode {i}: {len(tokens)} tokens, {len(loss_mask)} mask entries")
        if not tokens or loss_mask[0]:
            raise BatchError(f"SFT episode {i}: must start with a prompt token (loss mask 0)")
        seq = np.asarray(tokens[:seq_len], np.int32)
        n = len(seq)
        b["tokens"][i, :n] = seq
        b["targets"][i, : n - 1] = seq[1:]
        b["segment_ids"][i, :n] = 1
        b["mask"][i, : n - 1] = np.asarray(loss_mask[1:n], bool)  # position t predicts token t + 1
    return b


def _bins(lengths: np.ndarray, row_len: int, one_per_row: bool) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing (or one sample per row)."""
    if one_per_row:
        return [[i] for i in range(len(lengths))]
    rows, fill = [], []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        if n == 0:
            continue
        for r, used in enumerate(fill):
            if used + n <= row_len:
                rows[r].append(int(i))
                fill[r] += n
                break
        else:
            rows.append([int(i)])
            fill.append(n)
    return rows


def _bucket(rows: int, most: int, samples: int, row_multiple: int) -> int:
    """Row count rounded up to a step of ~most/MAX_ROW_BUCKETS rows (a multiple of row_multiple;
    ``most``: the rows the padded tokens would fill), never past ``samples`` rows (one sample per
    row always fits)."""
    step = -(-max(1, -(-most // MAX_ROW_BUCKETS)) // row_multiple) * row_multiple
    return max(row_multiple, min(-(-rows // step) * step, samples))


def pack(host: dict[str, np.ndarray], pack_len: int, parts: int, row_multiple: int) -> dict[str, np.ndarray]:
    """``host`` with its MODEL_KEYS ([N, S] per sample) replaced by packed rows [R, L] and
    'pack_index' [N, S] added: the flat index, within the sample's part, of the packed position
    holding its token t (0 past its end, where the mask is off).

    The N samples are cut into ``parts`` contiguous parts (the micro-batches), each packed into
    its own R/parts rows, so a micro-batch's rows hold only its samples. pack_len 0: one sample
    per row of S (the unpacked layout, same code path); else rows of pack_len tokens, samples
    placed first-fit decreasing, the row count bucketed (MAX_ROW_BUCKETS shapes at most) and a
    multiple of ``row_multiple`` (the mesh's data*fsdp) per part.
    """
    seg = host["segment_ids"]
    n, s = seg.shape
    if n % parts:
        raise BatchError(f"{n} samples do not split into {parts} micro-batches")
    lengths = (seg != 0).sum(axis=1)
    row_len = pack_len or s
    if lengths.max(initial=0) > row_len:
        raise BatchError(f"a sample of {int(lengths.max())} tokens exceeds trainer.pack_len={pack_len}")
    per = n // parts
    bins = [_bins(lengths[p * per:(p + 1) * per], row_len, pack_len == 0) for p in range(parts)]
    rows = _bucket(max(len(b) for b in bins), -(-per * s // row_len), per, row_multiple)
    out = {k: v for k, v in host.items() if k not in MODEL_KEYS}
    packed = {k: np.zeros((parts * rows, row_len), np.int32) for k in MODEL_KEYS}
    index = np.zeros((n, s), np.int32)
    for p, part in enumerate(bins):
        for r, members in enumerate(part):
            col = 0
            for j, i in enumerate(members):
                src = p * per + i
                m = int(lengths[src])
                dst = p * rows + r
                for k in ("tokens", "targets"):
                    packed[k][dst, col:col + m] = host[k][src, :m]
                packed["positions"][dst, col:col + m] = np.arange(m)
                packed["segment_ids"][dst, col:col + m] = j + 1
                index[src, :m] = r * row_len + col + np.arange(m)
                col += m
    out.update(packed, pack_index=index)
    return out
