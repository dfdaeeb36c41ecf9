"""RL train-step throughput of the trainer's Learner: tokens/s and achieved FLOP/s as a fraction of
this machine's matmul FLOP/s, measured in the same run. Prints one JSON line per model size.

    JAX_PLATFORMS=cpu python scripts/bench_train.py [--sizes small,100m --rows 8 --seq 128 --iters 2]

One step = the proximal log-prob recompute (forward, 2 * params * tokens FLOPs) plus the GRPO
loss's forward and backward (6 * params * tokens), with the arith_grpo config's loss and AdamW,
on a one-device mesh. tokens = rows * seq (every position goes through the model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from rlax_tpu import models, rl, sharding  # noqa: E402
from rlax_tpu.models import ModelConfig  # noqa: E402
from trainer import batching  # noqa: E402
from trainer.learner import Learner, LearnerSpec  # noqa: E402
from trainer.optim import make_optimizer  # noqa: E402
from trainer.state import create_state  # noqa: E402

SIZES = {  # (vocab, hidden, intermediate, layers, heads, kv heads)
    "small": (512, 128, 384, 4, 4, 2),  # the arith demo model (~1M params)
    "100m": (32000, 768, 2048, 12, 12, 4),  # ~100M params with tied embeddings
}


def matmul_flops(n: int = 1024, iters: int = 10) -> float:
    """The machine's f32 matmul FLOP/s (the baseline of the fraction)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def bench(size: str, rows: int, seq: int, iters: int, peak: float) -> dict:
    from configs.arith_grpo import get_config

    c = get_config("")
    vocab, hidden, inter, layers, heads, kv = SIZES[size]
    c.model.vocab_size, c.model.hidden_size, c.model.intermediate_size = vocab, hidden, inter
    c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = layers, heads, kv
    c.model.max_position_embeddings = max(seq, 256)
    c.rl.group_size = 4
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                              devices=jax.devices()[:1])
    model_cfg = ModelConfig.from_config(c.model)
    model = models.init(model_cfg, 0, mesh=mesh)
    optimizer, _ = make_optimizer(c.trainer)
    state, layout = create_state(model, model_cfg, mesh, optimizer, seed=0, with_value_head=False)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    spec = LearnerSpec(micro_batches=1, logprob_chunk=c.model.logprob_chunk, remat=False, compute_entropy=True,
                       temperature=c.inference.temperature)
    learner = Learner(mesh, layout, optimizer, spec, rl.build_loss(c.rl))

    rng = np.random.default_rng(0)
    host = batching.empty_rl_batch(rows, seq)
    prompt = 16
    host["tokens"][:] = rng.integers(1, vocab, (rows, seq))
    host["targets"][:, :-1] = host["tokens"][:, 1:]
    host["segment_ids"][:] = 1
    host["mask"][:, prompt - 1:seq - 1] = True
    host["behavior_logp"][host["mask"]] = -np.log(vocab)
    host["rewards"][:] = rng.random(rows)
    host["group_ids"][:] = np.arange(rows) // c.rl.group_size
    host["lengths"][:] = seq - prompt
    host.pop("versions")
    batch = learner.place(host)

    def step(state):
        prox = learner.recompute(state["params"], batch)[0]
        state, m = learner.rl_step(state, {**batch, "proximal_logp": prox})
        jax.block_until_ready(m)
        return state

    t0 = time.perf_counter()
    state = step(state)  # compiles
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        state = step(state)
    step_s = (time.perf_counter() - t0) / iters
    tokens = rows * seq
    flops = 8 * params * tokens  # 6 N T (fwd + bwd) + 2 N T (recompute)
    return {"size": size, "params": params, "rows": rows, "seq": seq, "tokens_per_step": tokens,
            "step_s": round(step_s, 4), "first_step_s": round(compile_s, 2),
            "tokens_per_s": round(tokens / step_s, 1), "achieved_flops": flops / step_s,
            "matmul_flops": peak, "fraction_of_matmul": round(flops / step_s / peak, 4),
            "backend": jax.default_backend(), "devices": 1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,100m")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=2)
    a = ap.parse_args()
    peak = matmul_flops()
    for size in a.sizes.split(","):
        print(json.dumps(bench(size, a.rows, a.seq, a.iters, peak)), flush=True)
    print(json.dumps({"matmul_flops_after": matmul_flops()}), flush=True)  # load drift check


if __name__ == "__main__":
    main()
