"""GSM8K with a pretrained instruct model: RL from its own checkpoint, with its own tokenizer and
chat template, answers checked by math-verify.

    python -m rlax_tpu.models.fetch smollm2                       # once: SmolLM2-135M-Instruct (GGUF)
    python -m rlax_tpu.launch --config=configs/gsm8k.py --workdir=runs/gsm8k
    python -m rlax_tpu.launch --config=configs/gsm8k.py:hf --config.model.hf_path=/ckpt/dir --workdir=...

Variants: '' or 'smollm2' (the SmolLM2 GGUF from the fetch cache), 'hf' (any Hugging Face
Llama / Qwen2 / Qwen3 checkpoint directory given by --config.model.hf_path: its tokenizer.json
and chat template come with it), 'ci' (SmolLM2 with short lengths and 2 steps: the CI test), 'lora'
(SmolLM2 as LoRA RL: rank 8 on every projection, alpha 32, ten times the full fine-tuning lr).
GSM8K here is the packaged test split divided by a hash of the question into train and
held-out (task.eval_fraction), not the published train/test split. Compute is bfloat16 on
TPU/GPU and float32 on CPU (model.dtype='auto'); the trainer's master weights are float32.
"""

from rlax_tpu.config import get_base_config, presets
from rlax_tpu.models.fetch import cached_path


def get_config(arg: str = ""):
    if arg not in ("", "smollm2", "hf", "ci", "lora"):
        raise ValueError(f"unknown variant {arg!r} (expected '', 'smollm2', 'hf', 'ci' or 'lora')")
    c = get_base_config()
    c.name = "gsm8k"
    c.task.name = "gsm8k"
    c.task.eval_fraction = 0.15  # ~200 held-out problems
    c.task.num_eval = 200
    c.task.answer_format = "any"  # '#### N', \boxed{N} or 'the answer is N'
    if arg == "hf":  # the checkpoint (and its tokenizer.json, chat template) from --config.model.hf_path
        presets.pretrained(c, "", "hf")
    else:  # the GGUF's weights, tokenizer and chat template
        presets.pretrained(c, cached_path("smollm2"), "gguf")
    c.rl.group_size = 8
    c.trainer.steps = 200
    c.trainer.batch_size = 16
    c.trainer.learning_rate = 1e-6
    c.trainer.warmup_steps = 5
    c.trainer.checkpoint_every = 20
    c.inference.max_seq_len = 640
    c.inference.max_new_tokens = 384
    c.inference.max_batch = 64
    c.inference.max_prefill_batch = 16
    c.replay.worker_max_leases = 8
    c.eval.num_samples = 4
    c.eval.ks = (1, 4)
    c.eval.every = 50
    if arg == "lora":
        c.name = "gsm8k_lora"
        c.lora.rank = 8
        c.lora.alpha = 32.0
        c.trainer.learning_rate = 1e-5
    if arg == "ci":
        c.task.num_eval = 4
        c.rl.group_size = 2
        c.rl.mini_batches = 1
        c.trainer.steps = 2
        c.trainer.batch_size = 1
        c.trainer.checkpoint_every = 1
        c.trainer.warmup_steps = 0
        c.inference.max_seq_len = 320
        c.inference.max_new_tokens = 8
        c.inference.max_batch = 4
        c.inference.max_prefill_batch = 2
        c.replay.worker_max_leases = 2
        c.eval.num_samples = 2
        c.eval.ks = (1, 2)
        c.eval.every = 0
        c.launch.num_workers = 1
        # Exact weights to the worker: the CI run checks engine and trainer agree on-policy.
        c.store.publish_dtype = "float32"
    return c
