"""Chunked target log-probs vs full-logits log_softmax: compiled temp memory and step time of
value_and_grad, measured in the same run. Prints one JSON line.

    JAX_PLATFORMS=cpu python scripts/bench_logprobs.py [--vocab 32768 --tokens 1024 --chunk 2048]
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
from flax import nnx  # noqa: E402

from rlax_tpu import models  # noqa: E402
from rlax_tpu.models import ModelConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=1024, help="B*T, as B=4")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=a.hidden // 4, arch="qwen2", qkv_bias=True,
                      qk_norm=False, tie_embeddings=False, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6,
                      max_position_embeddings=2048, param_dtype="float32", dtype="float32",
                      attention_impl="auto", logprob_chunk=a.chunk)
    gdef, state = nnx.split(models.init(cfg, 0))
    b = 4
    tokens = jax.random.randint(jax.random.key(0), (b, a.tokens // b), 0, a.vocab, jnp.int32)

    def chunked(s):
        return nnx.merge(gdef, s).target_logprobs(tokens, tokens).sum()

    def full(s):
        logp = jax.nn.log_softmax(nnx.merge(gdef, s)(tokens))
        return jnp.take_along_axis(logp, tokens[..., None], -1).sum()

    out = {"vocab": a.vocab, "tokens": a.tokens, "hidden": a.hidden, "chunk": a.chunk,
           "backend": jax.default_backend()}
    for name, fn in (("chunked", chunked), ("full", full)):
        compiled = jax.jit(jax.value_and_grad(fn)).lower(state).compile()
        out[f"{name}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
        jax.block_until_ready(compiled(state))
        t0 = time.perf_counter()
        for _ in range(a.iters):
            jax.block_until_ready(compiled(state))
        out[f"{name}_step_s"] = (time.perf_counter() - t0) / a.iters
    out["full_logits_bytes"] = a.tokens * a.vocab * 4
    out["temp_ratio_chunked_over_full"] = out["chunked_temp_bytes"] / out["full_temp_bytes"]
    out["time_ratio_chunked_over_full"] = out["chunked_step_s"] / out["full_step_s"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
