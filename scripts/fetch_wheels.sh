#!/usr/bin/env bash
# Downloads into .whl/ the cp312 manylinux wheels that scripts/device_check.sh installs on a GPU
# machine lacking them (python 3.12 with jax, flax, optax, orbax, tensorstore, torch and
# transformers preinstalled): grain and its array-record, cloudpickle and portpicker;
# ml-collections; gguf; pytest with its plugins. No dependencies are resolved (--no-deps): the
# rest is preinstalled there, and installing our own copies would shadow it.
#
#   scripts/fetch_wheels.sh [DIR]      (default .whl; needs network, run where pip can reach PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
python="${PYTHON:-python3}"
mkdir -p "$dest"
"$python" -m pip download -q --only-binary=:all: --no-deps -d "$dest" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any \
  grain==0.2.18 array-record==0.8.6 cloudpickle portpicker ml-collections==1.1.0 gguf \
  pytest pluggy iniconfig pytest-timeout
ls "$dest"
