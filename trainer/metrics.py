"""Per-step metrics: JSONL (always), TensorBoard (tensorboardX, if installed), console progress.

Only the primary process writes (``jax.process_index() == 0`` unless ``is_primary`` is given).
``<workdir>/metrics.jsonl`` gets one JSON object per step, flushed at once and appended to on
resume (earlier lines are never truncated; a line cut by kill -9 is closed off first). Values
may be Python, numpy or jax scalars; NaN and +-inf are written as the strings "nan", "inf",
"-inf" so the file stays valid JSON.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

# Console progress lines start with this; rlax_tpu.launch tails lines containing it.
PROGRESS_MARKER = "[progress]"


def to_scalar(name: str, value: Any) -> int | float | str | bool:
    """Converts a metric value to a JSON-able Python scalar; raises naming the metric otherwise."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    size = getattr(value, "size", 1)
    if size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {getattr(value, 'shape', '?')}")
    if hasattr(value, "item"):  # numpy/jax scalars and size-1 arrays of any rank
        value = value.item()
        if isinstance(value, (bool, int)):
            return value
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric {name!r}: cannot convert {type(value).__name__} to a number") from e


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class MetricsWriter:
    """Writes one record per step; prints a progress line every ``log_every`` steps.

    Args:
      workdir: run directory (created if missing).
      total_steps: the run's last step, for percentages and the ETA.
      log_every: console progress every this many steps (JSONL/TensorBoard get every step).
      tensorboard: also write TensorBoard events under <workdir>/tb (if tensorboardX imports).
      is_primary: whether this process writes; default ``jax.process_index() == 0``.
      console_keys: metric names shown on the console line (default: all, in insertion order).
      stream: where progress lines go (default stdout).
    """

    def __init__(self, workdir: str, *, total_steps: int, log_every: int, tensorboard: bool = True,
                 is_primary: bool | None = None, console_keys: Iterable[str] | None = None,
                 stream: TextIO | None = None):
        if is_primary is None:
            import jax

            is_primary = jax.process_index() == 0
        self.is_primary = is_primary
        self.total_steps = int(total_steps)
        self.log_every = max(1, int(log_every))
        self.console_keys = list(console_keys) if console_keys is not None else None
        self.stream = stream if stream is not None else sys.stdout
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = None
        self._tb = None
        self._last_log: tuple[float, int] | None = None  # (time, step) of the last console line
        self._tokens_since = 0.0
        # On a terminal the progress line is rewritten in place; into a log, one line each.
        self._inplace = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open_line = False
        if not is_primary:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path, "a+", encoding="utf-8")
        # A line cut by kill -9 would glue itself to the next record: close it off.
        if self._file.tell() > 0:
            self._file.seek(self._file.tell() - 1)
            if self._file.read(1) != "\n":
                self._file.write("\n")
                self._file.flush()
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: JSONL is the record of truth
                print("[metrics] tensorboardX not installed: TensorBoard output disabled", file=self.stream)
            else:
                self._tb = SummaryWriter(logdir=os.path.join(workdir, "tb"), flush_secs=10)

    def write(self, step: int, metrics: Mapping[str, Any], *, tokens: float | None = None) -> dict:
        """Records ``metrics`` for ``step``; ``tokens`` processed this step feed tokens/s.

        Returns the converted record (also on non-primary processes, which write nothing).
        """
        step = int(step)
        record: dict[str, Any] = {"step": step, "time": time.time()}
        for name, value in metrics.items():
            if name in ("step", "time"):
                raise ValueError(f"metric name {name!r} is reserved")
            record[name] = to_scalar(name, value)
        if tokens is not None:
            self._tokens_since += float(tokens)
        if not self.is_primary:
            return record
        line = json.dumps({k: _json_safe(v) for k, v in record.items()}, allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name not in ("step", "time") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self._tb.add_scalar(name, value, step)
        if step % self.log_every == 0 or step >= self.total_steps:
            self._print_progress(step, record, tokens is not None)
        return record

    def _print_progress(self, step: int, record: Mapping[str, Any], with_tokens: bool) -> None:
        now = time.time()
        parts = [f"{PROGRESS_MARKER} step {step}/{self.total_steps}"]
        if self.total_steps > 0:
            parts[0] += f" ({100.0 * step / self.total_steps:.1f}%)"
        if self._last_log is not None and now > self._last_log[0] and step > self._last_log[1]:
            dt = now - self._last_log[0]
            steps_per_s = (step - self._last_log[1]) / dt
            parts.append(f"{steps_per_s:.3g} steps/s")
            if with_tokens:
                parts.append(f"{self._tokens_since / dt:.4g} tok/s")
            parts.append(f"eta {_fmt_duration(max(0, self.total_steps - step) / steps_per_s)}")
        keys = self.console_keys if self.console_keys is not None else [
            k for k in record if k not in ("step", "time")]
        parts.extend(f"{k}={_fmt_value(record[k])}" for k in keys if k in record)
        line = " | ".join(parts)
        if self._inplace:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            self._open_line = True
        else:
            print(line, file=self.stream, flush=True)
        self._last_log = (now, step)
        self._tokens_since = 0.0

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Timer:
    """Accumulates wall time per phase within a step.

    ``with timer("train"): ...`` adds the block's duration to ``time/train``; ``pop()`` returns
    the accumulated ``{"time/<phase>": seconds}`` and resets. JAX dispatch is asynchronous:
    call ``jax.block_until_ready`` on the phase's outputs inside the block to time the work.
    """

    def __init__(self, prefix: str = "time/"):
        self.prefix = prefix
        self._totals: dict[str, float] = collections.defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._totals[phase] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"{self.prefix}{k}": v for k, v in self._totals.items()}
        self._totals.clear()
        return out


def histogram_fields(values: Iterable[int] | Mapping[int, int],
                     prefix: str = "staleness") -> dict[str, float]:
    """Counts per integer value as scalar fields: ``{prefix}/0``, ``{prefix}/1``, ... plus mean/max.

    ``values`` is either the observed values or a ``{value: count}`` mapping. An empty input gives
    only ``{prefix}/count = 0``.
    """
    if isinstance(values, Mapping):
        counts = {int(k): int(v) for k, v in values.items() if int(v) > 0}
    else:
        counts = dict(collections.Counter(int(v) for v in values))
    total = sum(counts.values())
    out: dict[str, float] = {f"{prefix}/count": total}
    if total == 0:
        return out
    for value in sorted(counts):
        out[f"{prefix}/{value}"] = counts[value]
    out[f"{prefix}/mean"] = sum(k * c for k, c in counts.items()) / total
    out[f"{prefix}/max"] = max(counts)
    return out
