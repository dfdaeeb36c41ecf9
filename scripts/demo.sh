#!/usr/bin/env bash
# The main job on one machine: from nothing, train a tokenizer and a small Qwen2-style model with
# SFT on a synthetic arithmetic task, run GRPO with 2 inference workers and the trainer as separate
# processes (param server + replay queue on file://), then print held-out pass@1 / pass@k before
# and after RL and write a PNG of the reward and eval curves.
#
#   scripts/demo.sh [WORKDIR] [extra flags for rlax_tpu.launch, e.g. --config.trainer.steps=20]
#
# WORKDIR defaults to runs/demo. An existing WORKDIR is resumed; delete it to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-runs/demo}"
shift || true
scripts/setup.sh plot
start=$(date +%s)
echo "[demo] workdir: $workdir (logs: $workdir/logs/)"
.venv/bin/python -m rlax_tpu.launch --config=configs/arith_grpo.py --workdir="$workdir" "$@"
echo "[demo] finished in $(( $(date +%s) - start ))s"
.venv/bin/python -m rlax_tpu.report --workdir="$workdir"
