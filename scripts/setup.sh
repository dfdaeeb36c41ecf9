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
# bubblewrap isolates the code sandbox (rlax_tpu/sandbox); installed where this can (root with
# apt-get), else the sandbox refuses or runs degraded as config.sandbox.require_bwrap says.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing bubblewrap (apt-get)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) \
      || echo "[setup] could not install bubblewrap; the code sandbox will refuse to run (see docs/envs.md)"
  else
    echo "[setup] bubblewrap missing and not installable here (needs root and apt-get); see docs/envs.md"
  fi
fi
