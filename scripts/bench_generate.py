"""Generation throughput: our engine vs transformers `generate` (torch CPU), same weights.

For each model size it builds a random Qwen2 model with transformers, saves it, loads it with
rlax_tpu.models.load_hf, and generates the same batch (same prompts, same prompt and output
lengths, EOS disabled so every sequence runs to max_new_tokens) greedy and sampled with both.
It also measures this machine's matmul FLOP/s in the same run and reports the engine's achieved
FLOP/s as a fraction of it. Prints one JSON object.

The engine runs in the layout one would deploy for each size on a CPU host. The small model's
per-step ops are too small for XLA:CPU's intra-op threads, so it runs on one XLA device per core
(``--devices``, default the core count) with its decode slots split over them (the mesh's data
axis; see docs/engine.md, "Slot groups"). The ~100M model's matmuls are big enough for XLA's
threads, and it runs on one device (``--devices_100m``). The other layout is timed in the same
rounds and reported as ``engine_alt``. transformers uses torch's intra-op threads over the same
cores.

  .venv/bin/python scripts/bench_generate.py            # small + ~100M models
  .venv/bin/python scripts/bench_generate.py --sizes=small --batch=32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

SIZES = {
    # ~1.6M params: overhead-bound, where batching and on-device loops matter most.
    "small": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    # ~100M params: compute-bound on this CPU.
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                 num_attention_heads=12, num_key_value_heads=4),
}


def matmul_flops(jax, jnp, n: int = 1024, reps: int = 20) -> float:
    """This machine's f32 matmul FLOP/s through XLA (the roofline we compare against)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def build_hf(size: str, path: str):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**SIZES[size], max_position_embeddings=512, tie_word_embeddings=True,
                                   rope_theta=10000.0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def hf_runner(model, prompts: np.ndarray, new_tokens: int, sample: bool):
    """A warmed-up callable running one transformers ``generate`` of the batch."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    kwargs.update(dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else
                  dict(do_sample=False))

    def run():
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        assert out.shape[1] == prompts.shape[1] + new_tokens

    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    return run


def engine_runner(engine, prompts: np.ndarray, new_tokens: int, sample: bool):
    """A warmed-up callable running one ``Engine.generate`` of the batch."""
    from inference_worker.engine import SamplingParams

    params = SamplingParams(temperature=1.0 if sample else 0.0, max_new_tokens=new_tokens, seed=1)
    lists = prompts.tolist()

    def run():
        outs = engine.generate(lists, params)
        assert all(len(o[0].tokens) == new_tokens for o in outs)

    run()  # warm-up: compiles every shape used below
    return run


def time_rounds(runners: dict, reps: int, warmup: int = 1) -> dict:
    """Wall times of each runner over ``reps`` rounds, the runners alternating within a round:
    on this shared VM speed comes in phases lasting seconds, so both sides of a ratio must be
    timed in the same phases. Within a round each runner first runs ``warmup`` untimed times, so
    the timed run finds its own weights and buffers in cache rather than the previous runner's
    (an engine serving rollouts runs back to back; a run right after torch's measured up to ~8%
    slower for the small model's ~55 ms generate, and ~1% for torch's ~270 ms one)."""
    times = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            for _ in range(warmup):
                run()
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: np.asarray(t) for name, t in times.items()}


def flops_per_token(cfg, context: int) -> float:
    """Forward FLOPs for one decoded token: 2 x matmul params + attention over the context."""
    h, L = cfg.hidden_size, cfg.num_layers
    d = cfg.head_dim
    attn_proj = h * d * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    mlp = 3 * h * cfg.intermediate_size
    head = h * cfg.vocab_size
    return 2 * (L * (attn_proj + mlp) + head) + 2 * L * cfg.num_heads * d * context * 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,100m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20, help="timed rounds per mode, small model (this VM runs "
                    "in fast and slow phases of seconds: 20 alternating rounds catch fast ones for both)")
    ap.add_argument("--devices", type=int, default=os.cpu_count() or 1,
                    help="XLA host devices (one per core) the small model's slots are split over")
    ap.add_argument("--devices_100m", type=int, default=1, help="the same for the ~100M model")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each side before its timed run "
                    "in every round (see time_rounds)")
    ap.add_argument("--reps_100m", type=int, default=1, help="the same for the ~100M model (each run is "
                    "seconds; keeps the whole benchmark under 5 minutes)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    for flag, n in (("--devices", args.devices), ("--devices_100m", args.devices_100m), ("cores", cores)):
        if n < 1 or args.batch % n:
            ap.error(f"--batch={args.batch} must divide by {flag}={n}")
    # Before jax is imported: the host platform's device count is fixed at start-up.
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={max(args.devices, args.devices_100m, cores)} "
                               + os.environ.get("XLA_FLAGS", ""))

    import jax
    import jax.numpy as jnp
    import torch

    from inference_worker.engine import Engine
    from rlax_tpu import models, sharding

    torch.set_num_threads(os.cpu_count() or 1)
    peak = matmul_flops(jax, jnp)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "jax_backend": jax.default_backend(), "matmul_flops": peak},
              "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens,
              "results": {}}
    rng = np.random.default_rng(0)
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hf_model = build_hf(size, tmp)
            model, cfg = models.load_hf(tmp)
        n_params = sum(p.numel() for p in hf_model.parameters())
        prompts = rng.integers(1, cfg.vocab_size, size=(args.batch, args.prompt_len))
        shape = dict(max_batch=args.batch, max_seq_len=args.prompt_len + args.new_tokens,
                     max_prefill_batch=min(args.batch, 32), decode_chunk=16)
        n_dev = args.devices_100m if size == "100m" else args.devices
        alt_dev = 1 if n_dev > 1 else cores

        def make_engine(n, cfg=cfg, model=model, shape=shape):
            mesh = sharding.make_mesh({"data": n, "fsdp": 1, "tensor": 1}, jax.devices()[:n]) if n > 1 else None
            return Engine(model, cfg, **shape, mesh=mesh)

        engines = {"ours": make_engine(n_dev)}
        if alt_dev != n_dev:
            engines["ours_alt"] = make_engine(alt_dev)
        entry = {"params": n_params, "engine_devices": n_dev}
        for mode in ("greedy", "sampled"):
            sample = mode == "sampled"
            reps = args.reps_100m if size == "100m" else args.reps
            runners = {"hf": hf_runner(hf_model, prompts, args.new_tokens, sample)}
            runners.update({k: engine_runner(e, prompts, args.new_tokens, sample) for k, e in engines.items()})
            times = time_rounds(runners, reps, args.warmup)
            t_hf, t_ours = times["hf"].min(), times["ours"].min()
            toks = args.batch * args.new_tokens
            achieved = toks * flops_per_token(cfg, args.prompt_len + args.new_tokens // 2) / t_ours
            entry[mode] = {
                "engine_tokens_per_s": toks / t_ours,
                "transformers_tokens_per_s": toks / t_hf,
                "speedup_vs_transformers": t_hf / t_ours,  # best run against best run
                # The same from each round's pair of runs (same load), median over rounds.
                "speedup_paired_median": float(np.median(times["hf"] / times["ours"])),
                "engine_flops_fraction_of_matmul_peak": achieved / peak,
            }
            if "ours_alt" in times:
                entry[mode]["engine_alt"] = {"devices": alt_dev, "tokens_per_s": toks / times["ours_alt"].min(),
                                             "speedup_vs_transformers": t_hf / times["ours_alt"].min()}
        report["results"][size] = entry
        print(json.dumps({size: entry}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
