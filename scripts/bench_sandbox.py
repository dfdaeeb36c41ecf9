"""Sandbox pool throughput: executions/s for a trivial program and for a unit-test run (the code
environment's harness: a solution and its hidden tests), per core, against plain
`python -I -S -c pass` subprocesses (the same interpreter and flags, no sandbox) at the same
concurrency, measured in the same run.

    python scripts/bench_sandbox.py --n 200
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import secrets
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlax_tpu.config import get_base_config  # noqa: E402
from rlax_tpu.envs.code import HARNESS  # noqa: E402
from rlax_tpu.sandbox import SandboxPool, layers  # noqa: E402
from rlax_tpu.sandbox.runner import interpreter  # noqa: E402

SOLUTION = "import math\n\ndef gcd(a, b):\n    return math.gcd(a, b)\n"
TESTS = ["_r = gcd(12, 18)\nassert type(_r) is int and _r == 6", "assert gcd(0, 5) == 5", "assert gcd(7, 13) == 1",
         "assert gcd(100, 75) == 25", "assert gcd(0, 0) == 0"]


def _rate(n: int, workers: int, fn) -> float:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda _: fn(), range(n)))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="executions per measurement")
    ap.add_argument("--workers", type=int, default=0,
                    help="concurrent executions; 0 = 4 per core (a sandbox start waits on the kernel's namespace "
                         "setup more than it computes)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    workers = args.workers or 4 * cores
    config = get_base_config()
    config.sandbox.workers = workers
    pool = SandboxPool.from_config(config.sandbox)
    bwrap, text = layers(pool.limits)
    exe = interpreter()[0]

    def plain():
        subprocess.run([exe, "-I", "-S", "-c", "pass"], check=True, env={})

    def trivial():
        res = pool.submit("pass").result()
        assert res.ok, res

    harness = HARNESS.format(solution=SOLUTION, tests=TESTS, per_test=1.0)

    def unit_tests():
        nonce = secrets.token_hex(8)
        res = pool.submit(harness, stdin=nonce + "\n").result()
        assert res.ok and f"{nonce}V pass pass pass pass pass" in res.stdout, res

    for fn in (plain, trivial, unit_tests):  # warm the page cache and the probe
        _rate(min(8, args.n), workers, fn)
    base = _rate(args.n, workers, plain)
    triv = _rate(args.n, workers, trivial)
    unit = _rate(args.n, workers, unit_tests)
    pool.shutdown()
    print(json.dumps({
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the host skews the rates
        "cores": cores, "workers": workers, "n": args.n, "bubblewrap": bwrap, "layers": text,
        "baseline_plain_python_per_s": round(base, 1), "baseline_per_core": round(base / cores, 1),
        "trivial_per_s": round(triv, 1), "trivial_per_core": round(triv / cores, 1),
        "unit_test_per_s": round(unit, 1), "unit_test_per_core": round(unit / cores, 1),
        "trivial_vs_baseline": round(triv / base, 3), "unit_test_vs_baseline": round(unit / base, 3),
        "goal_trivial_per_core": 20, "goal_met": triv / cores >= 20,
    }, indent=1))


if __name__ == "__main__":
    main()
