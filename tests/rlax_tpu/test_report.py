"""The report's smoothing and plot: a trend for long runs, one plain line for short ones."""

import pytest

from rlax_tpu import report


def test_smooth_is_a_trailing_mean_and_identity_on_short_runs():
    assert report.smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    short = [0.1, 0.9, 0.4]
    assert report.smooth(short) == short  # fewer than 40 points: window 1
    assert report.smooth([float(i % 2) for i in range(100)])[-1] == pytest.approx(0.6)  # window 5: 1,0,1,0,1


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = [{"step": i, "reward/mean": i / 10} for i in range(10)]
    evals = [{"step": 0, "pass@1": 0.1, "pass@4": 0.3}, {"step": 9, "pass@1": 0.5, "pass@4": 0.7}]
    path = str(tmp_path / "r.png")
    assert report.plot(metrics, evals, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_report_names_the_run_from_its_config(tmp_path, capsys):
    import json

    from rlax_tpu.config import load_config, run_config

    run_config.check(load_config("configs/arith_ppo.py:smoke"), str(tmp_path), write=True)
    record = {"step": 0, "pass@1": 0.25, "num_problems": 4, "num_samples": 2}
    (tmp_path / "eval.jsonl").write_text(json.dumps(record) + "\n")
    assert report.main(["--workdir", str(tmp_path)]) == 0
    assert f"run arith_ppo ({tmp_path})" in capsys.readouterr().out


def test_the_report_shows_the_policy_landed_check():
    ok = {"canary/checked": 12, "canary/failed": 0, "canary/workers_failing": 0}
    assert report.landed_line(ok) == "policy-landed check: all 12 checked weight swaps landed"
    bad = {"canary/checked": 12, "canary/failed": 2, "canary/workers_failing": 1}
    assert "2 of 12 weight swaps FAILED on 1 worker(s)" in report.landed_line(bad)


def test_the_table_shows_episode_counters_when_the_records_have_them():
    base = {"pass@1": 0.25, "num_problems": 4, "num_samples": 2}
    plain = report.table([{"step": 0, **base}, {"step": 4, **base}])
    assert "tool calls" not in plain
    evals = [{"step": 0, **base, "turns_mean": 1.5, "tool_calls_mean": 0.5, "masked": 0},
             {"step": 4, **base, "turns_mean": 2.0, "tool_calls_mean": 1.0, "masked": 1}]
    rows = {line.split("  ")[0]: line.split() for line in report.table(evals).splitlines()}
    assert rows["tool calls"][-3:] == ["0.50", "1.00", "+0.50"]
    assert rows["turns"][-3:] == ["1.50", "2.00", "+0.50"] and rows["masked"][-1] == "+1.00"
