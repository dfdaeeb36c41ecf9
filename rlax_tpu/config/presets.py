"""Shared sizes for the synthetic-task experiments in configs/ (each adds its algorithm).

``arith(config, variant)`` sets model, tokenizer, task, SFT, trainer and inference for:
  ''      the CPU demo: a ~1M-param Qwen2-style model, SFT then RL with 2 workers;
  'smoke' a seconds-long run for tests and the chaos test.
``countdown(config, variant)`` the same for the Countdown game (the RL studies in docs/rl.md).
``compose(config, variant)`` the same for list-operation composition (the extrapolation study).
``pretrained(config, hf_path, tokenizer_kind)`` RL straight from an instruct checkpoint.
"""

from __future__ import annotations

import ml_collections


def arith(c: ml_collections.ConfigDict, variant: str = "") -> ml_collections.ConfigDict:
    c.task.name = "arith"
    # 1-2 operations on operands 1..5: a ~1M-param model learns the facts in a few minutes of
    # SFT and is right part of the time, which is where RL has something to sharpen. 20% of the
    # problem space (by prompt hash) is held out for evaluation.
    c.task.max_number = 5
    c.task.min_difficulty = 1
    c.task.difficulty = 2
    c.task.eval_fraction = 0.2
    c.task.num_eval = 200
    c.tokenizer.kind = "train"
    c.tokenizer.vocab_size = 512  # an upper bound: the trained vocabulary is what the model gets
    c.model.arch = "qwen2"
    c.model.hidden_size = 128
    c.model.intermediate_size = 384
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.tie_embeddings = True
    c.model.max_position_embeddings = 256
    c.model.logprob_chunk = 512
    c.mesh.fsdp = -1
    # A short SFT warm start (150 x 64 traces) teaches the worked-step format and part of the
    # facts; longer SFT memorizes the small training split (400 steps: 51% held-out, and RL then
    # barely moves it), which leaves RL little that transfers to held-out problems.
    c.sft.steps = 150
    c.sft.batch_size = 64
    c.sft.learning_rate = 3e-3
    c.sft.warmup_steps = 20
    c.sft.max_len = 48
    c.rl.group_size = 8
    c.rl.max_staleness = 1
    # Four mini-batch updates per admitted batch, one pass: the ratio leaves 1 after the first
    # update, so the clip acts on most steps (one update per batch would make every loss plain
    # REINFORCE). Two passes (2x2) raised pass@1 as fast but cost pass@8 (docs/rl.md, demo study).
    c.rl.mini_batches = 4
    c.rl.ppo_epochs = 1
    # Drop groups whose samples all agree (no signal) and refill the batch (DAPO).
    c.rl.dynamic_sampling = True
    c.trainer.steps = 600
    c.trainer.batch_size = 8
    c.trainer.learning_rate = 1e-4
    c.trainer.warmup_steps = 5
    c.trainer.grad_clip = 1.0
    c.trainer.checkpoint_every = 50
    c.trainer.publish_every = 1
    c.inference.max_batch = 32
    c.inference.max_seq_len = 48
    c.inference.max_new_tokens = 24
    c.inference.temperature = 1.0
    c.replay.worker_max_leases = 4
    c.replay.lease_seconds = 30.0
    c.replay.poll_seconds = 0.05
    c.replay.heartbeat_seconds = 2.0
    c.store.publish_dtype = "float32"  # a tiny model: exact weights keep the policy on-policy
    c.launch.num_workers = 2
    c.eval.num_samples = 8
    c.eval.ks = (1, 4, 8)
    c.eval.every = 100  # held-out curve points during RL (each ~20 s)
    if variant == "smoke":
        c.task.num_eval = 16
        c.rl.dynamic_sampling = False  # an untrained smoke model scores 0 everywhere: keep every group
        c.model.hidden_size = 64
        c.model.intermediate_size = 128
        c.model.num_layers = 2
        c.sft.steps = 20
        c.sft.batch_size = 16
        c.rl.group_size = 4
        c.rl.mini_batches = 2
        c.trainer.steps = 4
        c.trainer.batch_size = 2
        c.trainer.checkpoint_every = 2
        c.trainer.warmup_steps = 1
        c.inference.max_batch = 8
        c.inference.max_new_tokens = 24
        c.inference.decode_chunk = 8
        c.replay.worker_max_leases = 2
        c.replay.lease_seconds = 10.0
        c.eval.num_samples = 2
        c.eval.ks = (1, 2)
        c.eval.every = 0
        c.trainer.sigterm_grace_s = 20.0
        c.launch.grace_s = 30.0
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (expected '' or 'smoke')")
    return c


def countdown(c: ml_collections.ConfigDict, variant: str = "") -> ml_collections.ConfigDict:
    """The arith demo's model and schedule on Countdown: reach a target from 2-3 numbers in 1..9
    (a short SFT on worked solutions first), 20% of the problem space held out by prompt hash."""
    arith(c, "smoke" if variant == "smoke" else "")
    c.task.name = "countdown"
    if variant != "smoke":
        c.rl.mini_batches, c.rl.ppo_epochs = 2, 2  # the studies' schedule (docs/rl.md)
    c.task.max_number = 9
    if variant != "smoke":
        c.sft.steps = 300  # a harder task than arith: a longer warm start before RL has signal
    c.task.min_difficulty = 1
    c.task.difficulty = 2
    c.tokenizer.vocab_size = 512
    c.sft.max_len = 48
    c.inference.max_seq_len = 48
    c.inference.max_new_tokens = 24
    if variant not in ("", "smoke"):
        raise ValueError(f"unknown variant {variant!r} (expected '' or 'smoke')")
    return c


def compose(c: ml_collections.ConfigDict, variant: str = "") -> ml_collections.ConfigDict:
    """The arith demo's model and schedule on compositions of list operations: trained on depth
    1-2, evaluated on depth 2 (held out by prompt hash); deeper evaluations measure extrapolation."""
    arith(c, "smoke" if variant == "smoke" else "")
    c.task.name = "compose"
    if variant != "smoke":
        c.rl.mini_batches, c.rl.ppo_epochs = 2, 2  # the studies' schedule (docs/rl.md)
    c.task.min_difficulty = 1
    c.task.difficulty = 2
    c.task.eval_min_difficulty = c.task.eval_difficulty = 2
    c.sft.max_len = 64
    c.inference.max_seq_len = 80
    c.inference.max_new_tokens = 48
    if variant not in ("", "smoke"):
        raise ValueError(f"unknown variant {variant!r} (expected '' or 'smoke')")
    return c


def pretrained(c: ml_collections.ConfigDict, hf_path: str, tokenizer_kind: str) -> ml_collections.ConfigDict:
    """RL from a pretrained instruct model: its checkpoint, its own tokenizer and chat template
    (tokenizer_kind 'gguf' or 'hf', read from the checkpoint), no SFT, bfloat16 compute on
    accelerators (float32 master weights);
    GRPO with clip-higher, two mini-batch updates per batch, one step of staleness under
    truncated IS."""
    c.model.hf_path = hf_path
    c.model.dtype = "auto"  # compute dtype; the trainer's master weights stay float32
    c.tokenizer.kind = tokenizer_kind
    c.sft.steps = 0
    c.mesh.fsdp = -1
    c.rl.advantage = "grpo"
    c.rl.policy_loss = "ppo"
    c.rl.clip_eps_low, c.rl.clip_eps_high = 0.2, 0.28
    c.rl.loss_agg = "token_mean"
    c.rl.max_staleness = 1
    c.rl.off_policy = "tis"
    c.rl.mini_batches = 2
    return c
