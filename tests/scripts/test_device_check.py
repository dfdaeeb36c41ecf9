"""scripts/device_check.sh dry-run on CPU: every part's command parses and one JSON comes out."""

import json
import os
import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "device_check.sh")


def _run(tmp_path, *args, **env):
    full = dict(os.environ, DEVICE_CHECK_DRY_RUN="1", PYTHON=sys.executable, **env)
    full.pop("OUT", None)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=full, cwd=ROOT,
                          timeout=300)


def test_dry_run_parses_every_part_and_writes_one_json(tmp_path):
    res = _run(tmp_path, "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["dry_run"] and report["all_ok"], json.dumps(report, indent=1)[-3000:]
    parts = report["parts"]
    assert set(parts) == {"env", "native_kernel_tests", "parity_bf16", "bench_generate", "bench_train"}
    assert parts["env"]["result"]["backend"] == "cpu"
    assert "10/20 tests collected" in parts["native_kernel_tests"]["stdout_tail"]  # the -m gpu tests
    for name in ("parity_bf16", "bench_generate", "bench_train"):
        assert "usage:" in parts[name]["stdout_tail"], parts[name]  # argparse accepted the flags


def test_needs_an_output_folder(tmp_path):
    res = _run(tmp_path)
    assert res.returncode == 2 and "--out" in res.stderr
