"""Trainer step benchmarks. Prints one JSON line per measurement.

    JAX_PLATFORMS=cpu python scripts/bench_train.py                  # the main job, packed vs padded
    JAX_PLATFORMS=cpu python scripts/bench_train.py --sizes small,100m [--rows 8 --seq 128 --iters 2]

Main job (default): configs/arith_smollm2.py's trainer step (SmolLM2-135M-Instruct, f32) on its
real batches: the first --batches x 4 prompts of the run's prompt order, 8 samples each generated
by our engine from the starting weights and scored by the task. One step = what trainer/run.py
does per batch: place, Learner.prepare (proximal log-probs, the KL reference's log-probs,
advantages) and Learner.rl_update (the config's mini-batch updates). Each layout steps every
batch once to compile its shapes; then --rounds timed passes run the layouts interleaved batch by
batch (padded: trainer.pack_len=0, one sample per row of inference.max_seq_len; packed: each
--pack_len), each layout from the same starting state, so a change of machine load hits them alike.
The summary line compares padded with the fastest packed run; row_tokens_saving is the share of
token slots (rows x row length, over the prepare pass and every update) packing saves.

--sizes: RL train-step throughput on synthetic batches (tokens/s and achieved FLOP/s as a
fraction of this machine's matmul FLOP/s, measured in the same run): the proximal recompute
(2 * params * tokens FLOPs) plus the GRPO loss's forward and backward (6 * params * tokens), with
the arith_grpo config's loss and AdamW, on a one-device mesh, every position through the model.
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
from rlax_tpu import tasks as tasks_lib  # noqa: E402
from rlax_tpu.models import ModelConfig  # noqa: E402
from trainer import batching, bootstrap  # noqa: E402
from trainer.learner import Learner, LearnerSpec, to_host  # noqa: E402
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
                       temperature=c.inference.temperature, ppo_epochs=1, mini_batches=1, pack_len=0)
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
    host.pop("weights_steps")
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


MAIN_JOB = "configs/arith_smollm2.py"


def main_job_setup(overrides: dict | None = None):
    """The main job's config, task, tokenizer, mesh and starting train state (as the trainer
    builds them), and its optimizer."""
    import tempfile

    from rlax_tpu.config import load_config
    from rlax_tpu.tokenizer import build as build_tokenizer
    from trainer.optim import make_optimizer as make_opt

    c = load_config(MAIN_JOB, overrides)
    task = tasks_lib.get_task(c.task)
    tok = build_tokenizer(c, tempfile.mkdtemp(prefix="bench_train_"), corpus=task.corpus())
    model_cfg = bootstrap.model_config(c, tok)
    mesh = sharding.make_mesh(c.mesh)
    optimizer, _ = make_opt(c.trainer, total_steps=c.trainer.steps,
                            updates_per_step=c.rl.ppo_epochs * c.rl.mini_batches)
    state, layout = bootstrap.initial_state(c, model_cfg, mesh, optimizer)
    return c, task, tok, model_cfg, mesh, optimizer, state, layout


def main_job_problems(c, task, n: int) -> list[dict]:
    """The first n prompts of the main job's prompt order."""
    it = iter(tasks_lib.prompt_dataset(task, "train", c.seed).to_iter_dataset())
    return [next(it) for _ in range(n)]


def generate_groups(c, task, tok, engine, problems: list[dict], seed: int) -> list:
    """Rollout groups of ``problems`` as a worker makes them (sampling, scoring), admitted."""
    from inference_worker.engine import SamplingParams
    from rlax_tpu.replay.records import RolloutGroup, Sample, Task
    from trainer.replay_controller import Admitted

    inf = c.inference
    prompts = [tok.encode_prompt(p["prompt"]) for p in problems]
    outs = engine.generate(prompts, [SamplingParams(temperature=inf.temperature, top_k=inf.top_k, top_p=inf.top_p,
                                                    max_new_tokens=inf.max_new_tokens, n=c.rl.group_size,
                                                    seed=seed + i, stop_token_ids=(tok.eos_id,))
                                     for i in range(len(prompts))])
    rewards = iter(task.rewards([p for p, cs in zip(problems, outs, strict=True) for _ in cs],
                                [tok.decode(o.tokens) for cs in outs for o in cs]))
    groups = []
    for i, (p, prompt, cs) in enumerate(zip(problems, prompts, outs, strict=True)):
        samples = tuple(Sample(np.asarray(o.tokens, np.int32), np.asarray(o.raw_logprobs, np.float32), 0,
                               float(next(rewards).score), {}, o.finish_reason) for o in cs)
        t = Task(f"{i:06d}", p["prompt_id"], np.asarray(prompt, np.int32), {}, c.rl.group_size, seed + i, 0)
        groups.append(Admitted(t, RolloutGroup(t.task_id, samples, "bench", {}), 0))
    return groups


def make_engine(c, layout, model_cfg, params):
    from flax import nnx

    from inference_worker.engine import Engine

    host = jax.device_put(to_host(params["model"]), jax.devices()[0])
    return Engine.from_config(c.inference, nnx.merge(layout.graphdef, host), model_cfg)


class MainJobStep:
    """The trainer's per-batch work (trainer/run.py): place, prepare, rl_update."""

    def __init__(self, c, mesh, layout, optimizer, pack_len: int):
        spec = LearnerSpec(micro_batches=c.trainer.micro_batches, logprob_chunk=c.model.logprob_chunk,
                           remat=c.trainer.remat, compute_entropy=True, temperature=c.inference.temperature,
                           ppo_epochs=c.rl.ppo_epochs,
                           mini_batches=c.rl.mini_batches, pack_len=pack_len)
        self.c, self.learner = c, Learner(mesh, layout, optimizer, spec, rl.build_loss(c.rl))

    def __call__(self, state, ref, host: dict, seed: int):
        batch = self.learner.place(host)
        batch = self.learner.prepare(state["params"], batch, ref)
        state, m = self.learner.rl_update(state, batch, seed=seed, host=host)
        jax.block_until_ready(state["params"])
        return state, m

    def row_tokens(self, host: dict) -> int:
        """Token slots the model runs on per step: the prepare pass plus every update's rows."""
        lr = self.learner
        total = lr.pack(host)["tokens"].size
        if lr.spec.updates_per_batch > 1:
            from trainer.learner import group_rows, mini_batch_groups

            for groups in mini_batch_groups(len(host["rewards"]) // lr.group_size, lr.spec, 0):
                rows = group_rows(groups, lr.group_size)
                total += lr.pack({k: host[k][rows] for k in batching.MODEL_KEYS})["tokens"].size
        else:
            total += lr.pack(host)["tokens"].size
        return int(total)


def bench_main_job(batches: int, pack_lens: list[int], rounds: int) -> list[dict]:
    c, task, tok, model_cfg, mesh, optimizer, state, layout = main_job_setup()
    problems = main_job_problems(c, task, batches * c.trainer.batch_size)
    engine = make_engine(c, layout, model_cfg, state["params"])
    t0 = time.perf_counter()
    groups = generate_groups(c, task, tok, engine, problems, c.seed)
    gen_s = time.perf_counter() - t0
    del engine
    hosts = []
    for b in range(batches):
        host = batching.rl_batch(groups[b * c.trainer.batch_size:(b + 1) * c.trainer.batch_size],
                                 c.inference.max_seq_len)
        host.pop("weights_steps")
        hosts.append(host)
    start = to_host(state)
    modes = [("padded", 0)] + [(f"packed{n}", n) for n in pack_lens]
    runs = {}
    for name, pl in modes:  # a first pass per layout compiles every shape its batches need
        step = MainJobStep(c, mesh, layout, optimizer, pl)
        st = jax.device_put(start, jax.tree.map(lambda x: x.sharding, state))
        ref = jax.tree.map(lambda x: x.copy(), st["params"]["model"]) if c.rl.kl_coef > 0 else None
        first = []
        for b, host in enumerate(hosts):
            t0 = time.perf_counter()
            st, _ = step(st, ref, host, seed=b)
            first.append(time.perf_counter() - t0)
        runs[name] = [step, st, ref, first, []]
    del state, start
    for rnd in range(rounds):  # timed: the layouts interleaved batch by batch, so load drift hits all
        for b, host in enumerate(hosts):
            for name, _ in modes:
                step, st, ref, _, times = runs[name]
                t0 = time.perf_counter()
                runs[name][1], _ = step(st, ref, host, seed=b + rnd + 1)
                times.append(time.perf_counter() - t0)
    out, results = {}, []
    for name, pl in modes:
        step, _, _, first, times = runs[name]
        out[name] = {"step_s": float(np.median(times)), "times": times,
                     "row_tokens_per_step": float(np.mean([step.row_tokens(h) for h in hosts]))}
        results.append({"mode": name, "pack_len": pl, "step_s": round(out[name]["step_s"], 3),
                        "step_times_s": [round(t, 2) for t in times], "first_pass_s": [round(t, 2) for t in first],
                        "row_tokens_per_step": out[name]["row_tokens_per_step"]})
        print(json.dumps(results[-1]), flush=True)
    real = float(np.mean([h["segment_ids"].astype(bool).sum() for h in hosts]))
    pad = out["padded"]
    best = min(pack_lens, key=lambda n: out[f"packed{n}"]["step_s"])
    pk = out[f"packed{best}"]
    pairs = np.asarray(pk["times"]) / np.asarray(pad["times"])  # adjacent steps: the same load
    return results + [{
        "job": MAIN_JOB, "batches": batches, "samples_per_batch": len(hosts[0]["rewards"]),
        "updates_per_step": c.rl.ppo_epochs * c.rl.mini_batches, "kl_reference": c.rl.kl_coef > 0,
        "real_tokens_per_batch": real, "generate_s": round(gen_s, 2),
        "padded_step_s": round(pad["step_s"], 3), "best_pack_len": best, "packed_step_s": round(pk["step_s"], 3),
        "packed_over_padded": round(pk["step_s"] / pad["step_s"], 3),
        "packed_over_padded_adjacent_median": round(float(np.median(pairs)), 3),
        "speedup": round(pad["step_s"] / pk["step_s"], 3),
        "row_tokens_saving": round(1 - pk["row_tokens_per_step"] / pad["row_tokens_per_step"], 3),
        "backend": jax.default_backend(), "devices": jax.device_count()}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="", help="synthetic throughput for these sizes (small,100m)")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--batches", type=int, default=2, help="main job: real batches to time")
    ap.add_argument("--rounds", type=int, default=2, help="main job: timed passes over the batches")
    ap.add_argument("--pack_len", default="144,256", help="main job: the packed runs' trainer.pack_len values")
    a = ap.parse_args()
    if not a.sizes:
        for rec in bench_main_job(a.batches, [int(n) for n in a.pack_len.split(",")], a.rounds)[-1:]:
            print(json.dumps(rec), flush=True)
        return
    peak = matmul_flops()
    for size in a.sizes.split(","):
        print(json.dumps(bench(size, a.rows, a.seq, a.iters, peak)), flush=True)
    print(json.dumps({"matmul_flops_after": matmul_flops()}), flush=True)  # load drift check


if __name__ == "__main__":
    main()
