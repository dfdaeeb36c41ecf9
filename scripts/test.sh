#!/usr/bin/env bash
# Sets up the venv if needed, then runs ruff and the whole test suite on CPU with 8 fake devices.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/param_server/test_store.py -k cas).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
.venv/bin/python -m ruff check .
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
