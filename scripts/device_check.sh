#!/usr/bin/env bash
# One prepared run on a machine with a GPU: native kernel tests, engine parity with transformers
# on SmolLM2 in bf16, bench_generate and bench_train with small settings. Writes one JSON,
# device_check.json, to --out DIR (default $OUT) and finishes in under 8 minutes (each part has
# its own timeout; a part that fails or times out is recorded and the rest still run).
#
#   scripts/device_check.sh [--out DIR] [--gguf_dir DIR]
#
# The machine has python3 with jax (CUDA), flax, optax, orbax, tensorstore, torch and
# transformers preinstalled but not grain, ml-collections or gguf: their cp312 wheels are
# expected in .whl/ (scripts/fetch_wheels.sh downloads them) and are installed with --no-deps
# into /tmp/site, put on PYTHONPATH. The preinstalled jax is used as it is (no pins installed).
# --gguf_dir: a folder holding the SmolLM2 GGUF (*.gguf); without one the parity part is skipped
# with a note. DEVICE_CHECK_DRY_RUN=1 checks every part's command parses (scripts --help, pytest
# --collect-only) instead of running it: the test suite runs that on CPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
repo=$PWD
out="${OUT:-}"
gguf_dir="${DEVICE_CHECK_GGUF_DIR:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --gguf_dir) gguf_dir="$2"; shift 2 ;;
    --gguf_dir=*) gguf_dir="${1#--gguf_dir=}"; shift ;;
    *) echo "device_check: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$out" ]; then
  echo "device_check: give --out DIR or set OUT" >&2
  exit 2
fi
mkdir -p "$out/parts"
dry="${DEVICE_CHECK_DRY_RUN:-0}"
python="${PYTHON:-python3}"
start=$(date +%s)

site=/tmp/site
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ] && [ "$dry" != 1 ]; then
  "$python" -m pip install -q --no-index --no-deps --target "$site" "${wheels[@]}" \
    > "$out/parts/wheels.log" 2>&1 || echo "device_check: wheel install failed (see parts/wheels.log)" >&2
fi
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry" = 1 ]; then
  export JAX_PLATFORMS=cpu
else
  export JAX_PLATFORMS="${DEVICE_CHECK_PLATFORMS:-cuda}"  # tests/conftest.py would default to cpu
fi

# part NAME TIMEOUT_S COMMAND...: runs it (or, dry, its parse check) and records rc/seconds.
part() {
  local name="$1" limit="$2"
  shift 2
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/parts/$name.out" 2> "$out/parts/$name.err"
  rc=$?
  echo "$rc $(( $(date +%s) - t0 )) $limit" > "$out/parts/$name.rc"
  echo "device_check: $name rc=$rc in $(( $(date +%s) - t0 ))s" >&2
}

skip() {
  echo "$2" > "$out/parts/$1.skipped"
  echo "device_check: $1 skipped: $2" >&2
}

if [ "$dry" = 1 ]; then
  help=(--help)
  collect=(--collect-only)
else
  help=()
  collect=()
fi

part env 60 "$python" -c "import jax, sys, json; print(json.dumps(dict(python=sys.version.split()[0], \
jax=jax.__version__, backend=jax.default_backend(), devices=[str(d) for d in jax.devices()])))"

part native_kernel_tests 170 "$python" -m pytest tests/rlax_tpu/kernels/test_native.py -m gpu -q \
  -p no:cacheprovider -o addopts="" "${collect[@]}"

gguf=""
if [ -n "$gguf_dir" ]; then
  for f in "$gguf_dir"/*.gguf; do gguf="$f"; break; done
fi
if [ -n "$gguf" ] || [ "$dry" = 1 ]; then
  part parity_bf16 100 "$python" scripts/engine_parity.py --gguf "${gguf:-none.gguf}" --dtype bfloat16 \
    --new_tokens 32 "${help[@]}"
else
  skip parity_bf16 "no SmolLM2 GGUF given (--gguf_dir DIR with the *.gguf); parity not run"
fi

# bench_generate pins one CPU engine per core of its affinity for its CPU comparison: one core.
pin=()
command -v taskset > /dev/null && pin=(taskset -c 0)
read -r -a gen_args <<< "${DEVICE_CHECK_GENERATE_ARGS:---sizes=small,100m --batch=16 --reps=3 --reps_100m=1}"
part bench_generate 110 "${pin[@]}" "$python" scripts/bench_generate.py "${gen_args[@]}" "${help[@]}"
part bench_train 80 "$python" scripts/bench_train.py --sizes=small,100m --rows=8 --seq=128 --iters=3 \
  "${help[@]}"

"$python" - "$out" "$dry" "$start" <<'EOF'
import glob, json, os, sys, time

out, dry, start = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])


def parse(text):
    """The part's JSON: one document, or one object per line, else None."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    docs = []
    for line in text.splitlines():
        try:
            docs.append(json.loads(line))
        except ValueError:
            continue
    return docs or None


parts = {}
for path in sorted(glob.glob(os.path.join(out, "parts", "*.rc")) + glob.glob(os.path.join(out, "parts", "*.skipped"))):
    name, kind = os.path.splitext(os.path.basename(path))
    if kind == ".skipped":
        parts[name] = {"skipped": open(path).read().strip()}
        continue
    rc, secs, limit = (int(x) for x in open(path).read().split())
    stdout = open(os.path.join(out, "parts", name + ".out")).read()
    stderr = open(os.path.join(out, "parts", name + ".err")).read()
    parts[name] = {"rc": rc, "ok": rc == 0, "timed_out": rc in (124, 137), "seconds": secs, "limit_s": limit,
                   "result": parse(stdout), "stdout_tail": stdout[-3000:], "stderr_tail": stderr[-2000:]}
report = {"dry_run": dry, "seconds": int(time.time()) - start, "all_ok": all(p.get("ok", True) for p in parts.values()),
          "parts": parts}
with open(os.path.join(out, "device_check.json"), "w") as f:
    json.dump(report, f, indent=1)
print(json.dumps({"all_ok": report["all_ok"], "seconds": report["seconds"],
                  "parts": {k: v.get("rc", "skipped") for k, v in parts.items()}}))
EOF
