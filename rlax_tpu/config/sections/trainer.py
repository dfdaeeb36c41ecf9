"""config.trainer: optimization, checkpointing, publishing, logging and shutdown."""

import ml_collections

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.config.sections._checks import in_range, one_of, positive, require

SECTION = "trainer"
SCHEDULES = ("constant", "cosine", "linear")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Number of RL steps (rl.ppo_epochs x rl.mini_batches optimizer updates each); the
    # learning-rate schedule spans their updates.
    c.steps = 100
    # Prompts (groups) per RL step; the batch is batch_size * rl.group_size sequences.
    c.batch_size = 8
    # The batch is split into this many micro-batches whose gradients are accumulated before one
    # update (memory knob; the update is the same). batch_size must be divisible by it.
    c.micro_batches = 1
    # Rematerialize (recompute) each transformer block's activations in the backward pass.
    c.remat = False
    # Sequence packing: the model's inputs go several samples to a row of this many tokens (each
    # sample its own attention segment, its positions from 0; first-fit, the row count bucketed),
    # so the forward passes do not run on padding up to inference.max_seq_len. 0: one sample per
    # row of inference.max_seq_len (no packing). Must be >= inference.max_seq_len, and >=
    # sft.max_len when the run does SFT.
    c.pack_len = 0

    # --- optimizer: AdamW with decoupled weight decay (not applied to norms, biases, 1-d params)
    # Peak learning rate.
    c.learning_rate = 1e-5
    # Learning-rate schedule after warm-up: 'constant', 'cosine' (decay to min_lr_ratio *
    # learning_rate at `steps`) or 'linear' (same end point, linear).
    c.schedule = "constant"
    # Linear warm-up from 0 to learning_rate over this many steps (0 = none).
    c.warmup_steps = 0
    # Final learning rate of the 'cosine'/'linear' decay, as a fraction of learning_rate.
    c.min_lr_ratio = 0.1
    # AdamW decoupled weight decay coefficient (0 disables it).
    c.weight_decay = 0.0
    # Adam first/second moment decay rates and the denominator epsilon.
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    # Clip gradients to this global L2 norm before the update (0 disables clipping).
    c.grad_clip = 1.0

    # --- checkpointing, publishing, logging
    # Save an orbax checkpoint every this many steps (and at the end and on SIGTERM), keeping the
    # newest keep_checkpoints.
    c.checkpoint_every = 10
    c.keep_checkpoints = 2
    # Write checkpoints in a background thread (the step loop only waits for the host copy).
    c.async_checkpoint = True
    # Publish weights to the parameter server every this many steps.
    c.publish_every = 1
    # Print a console progress line every this many steps (metrics.jsonl gets every step).
    c.log_every = 1
    # Also write TensorBoard event files under <workdir>/tb (needs tensorboardX).
    c.tensorboard = True

    # --- process
    # After SIGTERM/SIGINT the trainer finishes or cuts the current step, saves a checkpoint and
    # exits 0; if that takes longer than this many seconds it is force-exited (non-zero).
    c.sigterm_grace_s = 30.0
    # Call jax.distributed.initialize() at start (multi-host TPU pods; same as --multihost).
    c.multihost = False
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    for f in ("steps", "batch_size", "micro_batches", "checkpoint_every", "keep_checkpoints",
              "publish_every", "log_every", "learning_rate", "sigterm_grace_s"):
        positive(SECTION, c, f)
    for f in ("warmup_steps", "weight_decay", "grad_clip"):
        positive(SECTION, c, f, allow_zero=True)
    for f in ("steps", "batch_size", "micro_batches", "checkpoint_every", "keep_checkpoints",
              "publish_every", "log_every", "warmup_steps"):
        require(isinstance(c[f], int) and not isinstance(c[f], bool), f"{SECTION}.{f}",
                f"must be an int, got {c[f]!r}")
    for f in ("remat", "async_checkpoint", "tensorboard", "multihost"):
        require(isinstance(c[f], bool), f"{SECTION}.{f}", f"must be a bool, got {c[f]!r}")
    one_of(SECTION, c, "schedule", SCHEDULES)
    in_range(SECTION, c, "min_lr_ratio", 0.0, 1.0)
    for f in ("b1", "b2"):
        value = c[f]
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ConfigError(f"{SECTION}.{f}", f"must be in [0, 1), got {value!r}")
    positive(SECTION, c, "eps")
    require(c.batch_size % c.micro_batches == 0, f"{SECTION}.batch_size",
            f"must be divisible by trainer.micro_batches={c.micro_batches}, got {c.batch_size}")
    require(isinstance(c.pack_len, int) and not isinstance(c.pack_len, bool) and c.pack_len >= 0,
            f"{SECTION}.pack_len", f"must be an int >= 0, got {c.pack_len!r}")
    longest = max(config.inference.max_seq_len, config.sft.max_len if config.sft.steps > 0 else 0)
    require(c.pack_len == 0 or c.pack_len >= longest, f"{SECTION}.pack_len",
            f"must be 0 or >= the longest sample ({longest}: inference.max_seq_len, sft.max_len), "
            f"got {c.pack_len}")
    require(c.warmup_steps <= c.steps, f"{SECTION}.warmup_steps",
            f"must be <= trainer.steps={c.steps}, got {c.warmup_steps}")
