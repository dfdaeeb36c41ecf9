"""Generation throughput on the real SmolLM2-135M-Instruct: our engine vs transformers `generate`.

Both load the same GGUF (``python -m rlax_tpu.models.fetch smollm2``; dequantized to f32 by each
side's own loader) and generate the same batch of random prompts (same prompt and output lengths,
EOS disabled so every sequence runs to ``--new_tokens``), greedy and sampled (T=1), for each
``--batches`` size, the two sides alternating within each round. Also measured in the same run:

- KV-cache bytes of a GRPO group (``--group`` samples of one prompt) in the paged cache, counted
  from the engine's page allocator, against the dense per-slot cache it replaced;
- optionally (``--per_core``) one pinned engine per core, as ``rlax_tpu.launch`` runs workers.

Prints one JSON on stdout (progress on stderr).

  JAX_PLATFORMS=cpu .venv/bin/python scripts/bench_generate.py
  JAX_PLATFORMS=cpu .venv/bin/python scripts/bench_generate.py --batches=16 --reps=3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np


def hf_runner(model, prompts: np.ndarray, new_tokens: int, sample: bool):
    """A warmed-up callable running one transformers ``generate`` of the batch, and the torch
    thread count it runs with: the faster of 1 and one per core on a short warm-up generate (on a
    loaded machine torch's threads spin waiting for each other: measured 10x slower with 2 than
    with 1 at a load of 13 on 2 cores; on a quiet one more threads win)."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    kwargs.update(dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else
                  dict(do_sample=False))
    short = {**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}
    best = (np.inf, 1)
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        with torch.no_grad():
            model.generate(ids, **short)
            t0 = time.perf_counter()
            model.generate(ids, **short)
        best = min(best, (time.perf_counter() - t0, threads))
    threads = best[1]

    def run():
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        assert out.shape[1] == prompts.shape[1] + new_tokens

    return run, threads


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


def time_rounds(runners: dict, reps: int) -> dict:
    """Wall times of each runner over ``reps`` rounds, the runners alternating within a round: on
    a shared machine speed comes in phases, so both sides of a ratio are timed in the same ones."""
    times = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: np.asarray(t) for name, t in times.items()}


def make_engine(model, cfg, batch: int, max_seq_len: int, **kw):
    from inference_worker.engine import Engine

    return Engine(model, cfg, max_batch=batch, max_seq_len=max_seq_len, max_prefill_batch=min(batch, 32),
                  decode_chunk=16, max_decode_chunk=64, num_pages=0, **kw)


def kv_bytes_of_a_group(model, cfg, group: int, prompt_len: int, new_tokens: int, page_size: int) -> dict:
    """Pages a GRPO group holds once generated (retained, so nothing is freed yet), in bytes, and
    what the dense cache (one max_seq_len slab per sample) held for the same group."""
    from inference_worker.engine import SamplingParams

    max_seq_len = prompt_len + new_tokens
    engine = make_engine(model, cfg, group, max_seq_len, page_size=page_size)
    prompt = np.random.default_rng(1).integers(3, cfg.vocab_size, size=prompt_len).tolist()
    rid = engine.submit(prompt, SamplingParams(temperature=1.0, max_new_tokens=new_tokens, n=group, seed=2),
                        retain=True)
    while engine.step():
        pass
    engine.take_finished()
    pages = engine.pages_in_use
    itemsize = np.dtype(cfg.jnp_dtype).itemsize
    per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize  # K and V, every layer
    engine.release(rid)
    paged = pages * page_size * per_position
    dense = group * max_seq_len * per_position
    return {"group": group, "prompt_len": prompt_len, "new_tokens": new_tokens, "page_size": page_size,
            "pages": pages, "paged_bytes": paged, "dense_bytes": dense, "dense_over_paged": dense / paged}


SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def child(args) -> None:
    """One pinned engine: build, warm up, print 'ready', wait for a line on stdin, then time
    ``reps`` generates and print their wall times as JSON."""
    from rlax_tpu import models

    model, cfg = models.load(args.child)
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(args.child_batch, args.prompt_len))
    engine = make_engine(model, cfg, args.child_batch, args.prompt_len + args.new_tokens, page_size=args.page_size)
    run = engine_runner(engine, prompts, args.new_tokens, args.mode == "sampled")
    print("ready", flush=True)
    sys.stdin.readline()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    print(json.dumps(times), flush=True)


def per_core_engines(path: str, args, batch: int, mode: str) -> dict:
    """One pinned engine process per core generating at once; their aggregate tokens/s."""
    cores = sorted(os.sched_getaffinity(0))
    env = dict(os.environ, XLA_FLAGS=SINGLE_THREAD_XLA, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = []
    for core in cores:
        cmd = [sys.executable, os.path.abspath(__file__), f"--child={path}", f"--mode={mode}", f"--reps={args.reps}",
               f"--child_batch={batch}", f"--prompt_len={args.prompt_len}", f"--new_tokens={args.new_tokens}",
               f"--page_size={args.page_size}"]
        procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      preexec_fn=lambda core=core: os.sched_setaffinity(0, {core})))
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a pinned engine failed to start (exit {p.wait()})")
    for p in procs:  # start together
        p.stdin.write("go\n")
        p.stdin.flush()
    times = [json.loads(p.stdout.readline()) for p in procs]
    for p in procs:
        p.wait()
    toks = batch * args.new_tokens
    return {"engines": len(procs), "aggregate_tokens_per_s": sum(toks * len(t) / sum(t) for t in times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="16,64,256")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=1, help="timed rounds per batch and mode (each side once a round)")
    ap.add_argument("--group", type=int, default=8, help="samples of one prompt for the KV-bytes count (GRPO)")
    ap.add_argument("--group_prompt_len", type=int, default=200)
    ap.add_argument("--page_size", type=int, default=16)
    ap.add_argument("--per_core", action="store_true", help="also run one pinned engine per core")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child_batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="greedy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import jax
    import torch
    import transformers

    from rlax_tpu import models
    from rlax_tpu.models.fetch import fetch

    path = fetch("smollm2")
    model, cfg = models.load(path)
    d, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    batches = [int(b) for b in args.batches.split(",")]
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                          "jax_backend": jax.default_backend(), "torch": torch.__version__,
                          "transformers": transformers.__version__},
              "model": os.path.basename(path), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "page_size": args.page_size, "results": {}}
    report["kv_cache"] = kv_bytes_of_a_group(model, cfg, args.group, args.group_prompt_len, args.new_tokens,
                                             args.page_size)
    print(json.dumps({"kv_cache": report["kv_cache"]}), file=sys.stderr, flush=True)
    rng = np.random.default_rng(0)
    for batch in batches:
        prompts = rng.integers(3, cfg.vocab_size, size=(batch, args.prompt_len))
        engine = make_engine(model, cfg, batch, args.prompt_len + args.new_tokens, page_size=args.page_size)
        entry = {}
        for mode in ("greedy", "sampled"):
            sample = mode == "sampled"
            hf_run, threads = hf_runner(hf, prompts, args.new_tokens, sample)
            runners = {"hf": hf_run, "ours": engine_runner(engine, prompts, args.new_tokens, sample)}
            load_before = os.getloadavg()[0]
            times = time_rounds(runners, args.reps)
            toks = batch * args.new_tokens
            entry[mode] = {"engine_tokens_per_s": toks / times["ours"].min(),
                           "transformers_tokens_per_s": toks / times["hf"].min(),
                           "speedup_vs_transformers": float(times["hf"].min() / times["ours"].min()),
                           "speedup_paired_median": float(np.median(times["hf"] / times["ours"])),
                           "torch_threads": threads,
                           # 1-minute load average before and after the timed rounds (a shared CPU).
                           "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            if args.per_core:
                entry[mode]["per_core_engines"] = per_core_engines(path, args, batch, mode)
            print(json.dumps({batch: {mode: entry[mode]}}), file=sys.stderr, flush=True)
        entry["engine_stats"] = {k: engine.stats[k] for k in ("decode_calls", "decode_steps", "prefill_calls",
                                                             "preemptions", "peak_pages")}
        report["results"][str(batch)] = entry
        del engine
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
