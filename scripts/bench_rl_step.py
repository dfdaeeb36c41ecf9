"""One RL step of the main job's shape with our stack and with TRL's GRPOTrainer, in one run.

    pip install -e '.[bench]'   # trl (benchmark-only)
    JAX_PLATFORMS=cpu python scripts/bench_rl_step.py [--pack_len 0 --trl_checkpointing 1]

The main job (configs/arith_smollm2.py): SmolLM2-135M-Instruct in f32, 4 prompts x 8 samples of up
to 24 new tokens at temperature 1, the same prompts in the run's order, the task's reward, then 2
mini-batch updates (1 epoch; PPO clip 0.2/0.28, token-mean loss, AdamW at the config's lr, no KL).
Both sides start from the same weights: ours as the trainer loads them from the GGUF, TRL from
those weights written as a Hugging Face directory (models.save_hf, the tokenizer files with the
chat template).

Ours = generation with our engine (inference_worker.engine) + the trainer step (place, prepare,
rl_update: scripts/bench_train.py's MainJobStep), each timed after a first call compiled it.
TRL = its whole step as a user runs it (GRPOTrainer.train, generation included:
steps_per_generation=2 optimizer steps of 16 completions per 32 generated), the second of two RL
steps (the first warms up), with TRL's default gradient checkpointing (--trl_checkpointing 0
turns it off; ours recomputes no activations: trainer.remat=False). Prints one JSON line: both
step times, the trainer step alone, and ours ÷ TRL speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_train's main-job helpers

import bench_train  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlax_tpu import models, run_meta  # noqa: E402
from rlax_tpu.kvstore import KVStore  # noqa: E402
from trainer import batching  # noqa: E402
from trainer.learner import to_host  # noqa: E402


def ours(pack_len: int) -> tuple[dict, dict]:
    c, task, tok, model_cfg, mesh, optimizer, state, layout = bench_train.main_job_setup()
    b = c.trainer.batch_size
    problems = bench_train.main_job_problems(c, task, 2 * b)
    engine = bench_train.make_engine(c, layout, model_cfg, state["params"])
    bench_train.generate_groups(c, task, tok, engine, problems[b:], c.seed + 1000)  # compiles
    t0 = time.perf_counter()
    groups = bench_train.generate_groups(c, task, tok, engine, problems[:b], c.seed)
    gen_s = time.perf_counter() - t0
    del engine
    host = batching.rl_batch(groups, c.inference.max_seq_len)
    host.pop("weights_steps")
    start = to_host(state["params"]["model"])
    step = bench_train.MainJobStep(c, mesh, layout, optimizer, pack_len)
    state, _ = step(state, None, host, seed=0)  # compiles this batch's shapes
    t0 = time.perf_counter()
    state, m = step(state, None, host, seed=1)
    train_s = time.perf_counter() - t0
    info = {"c": c, "task": task, "tok": tok, "model_cfg": model_cfg, "layout": layout, "params": start,
            "problems": problems}
    return {"generate_s": round(gen_s, 2), "train_step_s": round(train_s, 2),
            "rl_step_s": round(gen_s + train_s, 2), "pack_len": pack_len,
            "completion_tokens": int(host["mask"].sum()),
            "mean_reward": float(np.mean(host["rewards"]))}, info


def write_hf(info: dict, out: str) -> None:
    """The starting weights and the tokenizer (with its chat template) as a HF directory."""
    from flax import nnx

    graphdef = info["layout"].graphdef
    models.save_hf(nnx.merge(graphdef, info["params"]), info["model_cfg"], out)
    kv = KVStore.open("", out + "_store")
    run_meta.write_tokenizer(kv, info["tok"])
    for name, data in run_meta.stored_tokenizer_files(kv).items():
        path = os.path.join(out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def trl_step(info: dict, hf_dir: str, checkpointing: bool) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    c, task = info["c"], info["task"]
    b, n = c.trainer.batch_size, c.rl.group_size
    problems = info["problems"][:b] * 2  # RL step 2 sees the same 4 prompts as ours
    by_prompt = {p["prompt"]: p for p in problems}
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}], "key": p["prompt"]}
                              for p in problems])

    def reward(prompts, completions, key, **_):
        texts = [x[-1]["content"] if isinstance(x, list) else x for x in completions]
        return [float(r.score) for r in task.rewards([by_prompt[k] for k in key], texts)]

    marks = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=b * n // c.rl.mini_batches,
        steps_per_generation=c.rl.mini_batches, num_generations=n, num_iterations=c.rl.ppo_epochs,
        max_completion_length=c.inference.max_new_tokens, temperature=c.inference.temperature,
        learning_rate=c.trainer.learning_rate, lr_scheduler_type="constant", max_grad_norm=c.trainer.grad_clip,
        beta=c.rl.kl_coef, epsilon=c.rl.clip_eps_low, epsilon_high=c.rl.clip_eps_high, loss_type="dapo",
        max_steps=2 * c.rl.mini_batches, shuffle_dataset=False, use_cpu=True, bf16=False, fp16=False,
        report_to="none", logging_steps=1, save_strategy="no", seed=c.seed, dataloader_num_workers=0,
        gradient_checkpointing=checkpointing)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    processing = transformers.AutoTokenizer.from_pretrained(hf_dir)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=processing, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    per_rl = c.rl.mini_batches
    first, second = marks[per_rl - 1] - t0, marks[2 * per_rl - 1] - marks[per_rl - 1]
    prompt_len = len(processing(processing.apply_chat_template(data[0]["prompt"], add_generation_prompt=True,
                                                               tokenize=False))["input_ids"])
    return {"rl_step_s": round(second, 2), "first_rl_step_s": round(first, 2), "prompt_tokens": prompt_len,
            "gradient_checkpointing": checkpointing,
            "torch_threads": torch.get_num_threads(), "trl": __import__("trl").__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack_len", type=int, default=0, help="our trainer.pack_len (0: padded rows)")
    ap.add_argument("--trl_checkpointing", type=int, default=1,
                    help="TRL's gradient_checkpointing (1: its default; ours recomputes nothing: trainer.remat)")
    a = ap.parse_args()
    mine, info = ours(a.pack_len)
    print(json.dumps({"ours": mine}), file=sys.stderr, flush=True)
    hf_dir = os.path.join(tempfile.mkdtemp(prefix="bench_rl_step_"), "hf")
    write_hf(info, hf_dir)
    jax.clear_caches()
    theirs = trl_step(info, hf_dir, bool(a.trl_checkpointing))
    prompt_tokens = len(info["tok"].encode_prompt(info["problems"][0]["prompt"]))
    print(json.dumps({"job": bench_train.MAIN_JOB, "shape": "4 prompts x 8 samples, 2 mini-batch updates",
                      "ours": {**mine, "prompt_tokens": prompt_tokens}, "trl": theirs,
                      "speedup_rl_step": round(theirs["rl_step_s"] / mine["rl_step_s"], 3),
                      "speedup_train_step_vs_trl_rl_step": round(theirs["rl_step_s"] / mine["train_step_s"], 3),
                      "backend": jax.default_backend()}), flush=True)


if __name__ == "__main__":
    main()
