"""trainer.metrics: JSONL append-on-resume, NaN/inf, jax/numpy scalars, progress, helpers."""

import io
import json
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from trainer.metrics import PROGRESS_MARKER, MetricsWriter, Timer, histogram_fields


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_values_progress_and_resume(tmp_path):
    out = io.StringIO()
    w = MetricsWriter(str(tmp_path), total_steps=4, log_every=2, tensorboard=True, is_primary=True,
                      stream=out)
    w.write(1, {"loss": jnp.float32(0.5), "n": np.int64(3), "bad": float("nan"), "big": np.inf},
            tokens=100)
    time.sleep(0.01)
    w.write(2, {"loss": np.float32(0.25), "neg": -float("inf"), "arr": jnp.array([2.0])}, tokens=100)
    with pytest.raises(ValueError, match="'vec'"):
        w.write(3, {"vec": np.zeros(3)})
    w.close()
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 0.5 and rows[0]["n"] == 3 and isinstance(rows[0]["n"], int)
    assert rows[0]["bad"] == "nan" and rows[0]["big"] == "inf" and rows[1]["neg"] == "-inf"
    assert rows[1]["arr"] == 2.0
    console = out.getvalue().splitlines()
    assert len(console) == 1 and console[0].startswith(f"{PROGRESS_MARKER} step 2/4 (50.0%)")
    assert "loss=0.25" in console[0]
    assert os.listdir(tmp_path / "tb"), "TensorBoard events written"

    # kill -9 mid-line, then resume: earlier lines kept, the cut line closed off, new lines append.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    out = io.StringIO()
    w = MetricsWriter(str(tmp_path), total_steps=4, log_every=1, tensorboard=False, is_primary=True,
                      stream=out)
    w.write(3, {"loss": 0.1}, tokens=10)
    time.sleep(0.01)
    w.write(4, {"loss": 0.05}, tokens=10)
    w.close()
    with open(tmp_path / "metrics.jsonl") as f:
        raw = f.read().splitlines()
    assert raw[2] == '{"step": 3, "lo'
    good = [json.loads(x) for x in raw[:2] + raw[3:]]
    assert [r["step"] for r in good] == [1, 2, 3, 4]
    last = out.getvalue().splitlines()[-1]
    assert "steps/s" in last and "tok/s" in last and "eta 0:00:00" in last


def test_non_primary_writes_nothing(tmp_path):
    w = MetricsWriter(str(tmp_path / "run"), total_steps=2, log_every=1, is_primary=False,
                      stream=io.StringIO())
    rec = w.write(1, {"loss": jnp.float32(1.0)})
    w.close()
    assert rec["loss"] == 1.0
    assert not os.path.exists(tmp_path / "run")


def test_timer_and_histogram():
    t = Timer()
    with t("train"):
        time.sleep(0.01)
    with t("train"):
        pass
    with pytest.raises(RuntimeError):
        with t("publish"):
            raise RuntimeError("boom")
    got = t.pop()
    assert set(got) == {"time/train", "time/publish"} and got["time/train"] >= 0.01
    assert t.pop() == {}

    h = histogram_fields([0, 0, 1, 3])
    assert h == {"staleness/count": 4, "staleness/0": 2, "staleness/1": 1, "staleness/3": 1,
                 "staleness/mean": 1.0, "staleness/max": 3}
    assert histogram_fields({2: 2, 0: 0}, prefix="s") == {"s/count": 2, "s/2": 2, "s/mean": 2.0, "s/max": 2}
    assert histogram_fields([]) == {"staleness/count": 0}
