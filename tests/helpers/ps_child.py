"""Child process for param-server tests (run with subprocess, never imported by pytest).

    python tests/helpers/ps_child.py publish URL STEP          # 8 fake devices, one publish
    python tests/helpers/ps_child.py multihost URL PORT PID   # one of two JAX processes, 2 devices each
    python tests/helpers/ps_child.py deltas URL N FAULT       # delta publishing: versions 1..N of
        stepped_values, then RLAX_PS_FAULT=FAULT set for the publish of version N+1
    python tests/helpers/ps_child.py hold URL                 # a reader pins LATEST and prints its
        checksums, then on each stdin line re-reads that version from scratch and prints them again
Prints one JSON line with the result on success.
"""

import json
import os
import sys

# Imported by the tests for its helpers too: only a child run may touch the environment.
MODE = sys.argv[1] if __name__ == "__main__" else "import"
if __name__ == "__main__":
    NDEV = 2 if MODE == "multihost" else 8
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={NDEV}"
    os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402


def global_values(seed: int) -> dict:
    """The reference weights (numpy, f32) both the children and the test rebuild."""
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.standard_normal((16, 8), np.float32),
        "layers": [{"attn": {"q_proj": {"kernel": rng.standard_normal((8, 16), np.float32)}},
                    "norm": {"scale": rng.standard_normal((8,), np.float32)}} for _ in range(3)],
    }


SPECS = {"embed": P("fsdp", "tensor"), "kernel": P("fsdp", "tensor"), "scale": P()}


def spec_for(name: str) -> P:
    return SPECS[name.split("/")[-1]]


def build(mesh, seed: int):
    return _build_values(mesh, global_values(seed))


def _build_values(mesh, values: dict):
    from rlax_tpu.tree import path_str as leaf_name

    def make(path, x):
        sharding = NamedSharding(mesh, spec_for(leaf_name(path)))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map_with_path(make, values)


def stepped_values(k: int) -> dict:
    """global_values(1) after k small updates of a few elements each (changes survive bf16)."""
    vals = global_values(1)
    for i in range(1, k + 1):
        rng = np.random.default_rng(100 + i)
        vals = jax.tree.map(lambda x, r=rng: x + (r.random(x.shape) < 0.1) * np.float32(0.05), vals)
    return vals


def delta_options() -> dict:
    return {"delta": True, "keyframe_every": 3, "gc_keep": 1, "pin_ttl_s": 600.0}


def checksums(tree) -> list[int]:
    from param_server import delta

    return [delta.crc32c(np.asarray(x)) for x in jax.tree.leaves(tree)]


def target(mesh):
    """bf16 targets in an inference layout (kernels split over 'tensor', the rest replicated)."""
    from rlax_tpu.tree import path_str as leaf_name

    def make(path, x):
        spec = P(None, "tensor") if leaf_name(path).endswith("kernel") else P()
        return jax.ShapeDtypeStruct(x.shape, jax.numpy.bfloat16, sharding=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(make, global_values(1))


def main() -> None:
    if MODE == "publish":
        url, step = sys.argv[2], int(sys.argv[3])
        from param_server import ParamStore

        mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        store = ParamStore.open(url)
        version = store.publish(build(mesh, seed=step), step)
        print(json.dumps({"version": version}), flush=True)
    elif MODE == "deltas":
        url, n, fault = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        from param_server import ParamStore, faults

        mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        store = ParamStore.open(url, **delta_options())
        for k in range(n + 1):
            if k == n:
                os.environ[faults.ENV] = fault
            version = store.publish(_build_values(mesh, stepped_values(k)), k)
            print(json.dumps({"version": version, "kind": store.last_publish_stats["kind"]}), flush=True)
    elif MODE == "hold":
        url = sys.argv[2]
        from param_server import ParamStore

        mesh = jax.make_mesh((8,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
        store = ParamStore.open(url, **delta_options())
        version = store.latest_version()
        params, _ = store.read(target(mesh), version, reader="holder")  # pins it
        print(json.dumps({"version": version, "crc": checksums(params)}), flush=True)
        for _ in sys.stdin:
            params, _ = ParamStore.open(url, **delta_options()).read(target(mesh), version, reader="holder")
            print(json.dumps({"version": version, "crc": checksums(params)}), flush=True)
    elif MODE == "multihost":
        url, port, pid = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
        from param_server import ParamStore

        mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        params = build(mesh, seed=7)
        store = ParamStore.open(url)
        version = store.publish(params, step=7)
        print(json.dumps({"version": version, "process": jax.process_index(),
                          "devices": len(jax.devices()), **store.last_publish_stats}), flush=True)
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
