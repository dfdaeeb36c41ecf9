"""RL of SmolLM2-135M-Instruct on arithmetic at the edge of what it can do, on a CPU.

    python -m rlax_tpu.models.fetch smollm2
    python -m rlax_tpu.launch --config=configs/arith_smollm2.py --workdir=runs/arith_smollm2

Single-operation problems over 1..9 ('Compute: 7-3' plus 'Answer with just the number.'),
rendered with the model's own chat template; the reward is 1 when the last number the model
writes is the answer (task.answer_format='last_number'), whatever its wording. Sampled at
temperature 1 the model gets these right a minority of the time and greedy about half (its
knowledge is there, its sampling is diffuse), which is where RL has something to sharpen. No
SFT. 20 RL steps take ~15 minutes on 2 CPU cores (the README's main job: `scripts/demo.sh`).
Variant 'smoke': a few steps for tests. Variant 'lora': the same job as LoRA RL (rank 8 on every
projection, alpha 32, lr 1e-4: ten times the full fine-tuning rate, as "LoRA without regret"
finds for RL); the base is frozen and each published version holds only the adapters.
"""

from rlax_tpu.config import get_base_config, presets
from rlax_tpu.models.fetch import cached_path


def get_config(arg: str = ""):
    if arg not in ("", "smoke", "lora"):
        raise ValueError(f"unknown variant {arg!r} (expected '', 'smoke' or 'lora')")
    c = get_base_config()
    c.name = "arith_smollm2"
    c.task.name = "arith"
    c.task.operators = "+-"
    c.task.max_number = 9
    c.task.min_difficulty = c.task.difficulty = 1
    c.task.eval_fraction = 0.25  # 162 problems in all: ~40 held out
    c.task.num_eval = 40
    c.task.answer_format = "last_number"
    c.task.instruction = "Answer with just the number."
    presets.pretrained(c, cached_path("smollm2"), "gguf")
    c.model.logprob_chunk = 8192
    c.rl.group_size = 8
    c.trainer.steps = 20
    c.trainer.batch_size = 4
    c.trainer.learning_rate = 1e-5
    c.trainer.warmup_steps = 2
    c.trainer.checkpoint_every = 10
    c.inference.max_seq_len = 72  # the 43-token chat prompt + 24 new tokens
    c.inference.max_new_tokens = 24
    c.inference.max_batch = 32
    c.inference.max_prefill_batch = 8
    c.replay.worker_max_leases = 4
    c.launch.num_workers = 1
    c.store.publish_dtype = "float32"  # f32 on CPU: the engine samples exactly the trainer's policy
    c.eval.num_samples = 8
    c.eval.ks = (1, 4, 8)
    c.eval.every = 20  # before and after: each evaluation is ~2.5 min of CPU
    if arg == "lora":
        c.name = "arith_smollm2_lora"
        c.lora.rank = 8
        c.lora.alpha = 32.0
        c.trainer.learning_rate = 1e-4
    if arg == "smoke":
        c.trainer.steps = 2
        c.trainer.batch_size = 2
        c.rl.group_size = 2
        c.rl.mini_batches = 1
        c.task.num_eval = 4
        c.eval.num_samples = 2
        c.eval.ks = (1, 2)
        c.eval.every = 0
    return c
