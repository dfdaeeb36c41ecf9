#!/usr/bin/env bash
# Creates .venv if missing and installs the project with its extras. Idempotent and quick when
# everything is already installed. Usage: scripts/setup.sh [extras]   (default: test,plot)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,plot}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(cat setup.py | sha1sum | cut -c1-12)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing rlax_tpu[$extras] into .venv (a few minutes on a fresh machine)"
  .venv/bin/python -m pip install -q --upgrade pip
  # /opt/wheels holds a local torch CPU wheel on some machines; PyPI is used otherwise.
  find_links=()
  [ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
  .venv/bin/python -m pip install -q "${find_links[@]}" -e ".[$extras]"
  touch "$stamp"
fi
