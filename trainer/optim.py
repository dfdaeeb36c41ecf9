"""The trainer's optimizer: AdamW + global-norm clipping + a learning-rate schedule from config.

Weight decay skips norms, biases and every parameter with fewer than 2 dimensions (decaying a
norm scale or a bias towards 0 only hurts). Gradient accumulation is not done here: the learner
sums micro-batch gradients itself and calls ``update`` once per step.

Sharding: ``jax.jit(optimizer.init)`` alone leaves the moments on one device (nothing ties a
``zeros_like`` to its parameter's layout). Use ``opt_state_shardings`` for ``out_shardings``::

    shardings = opt_state_shardings(optimizer, params_abstract)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings)(params)
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlax_tpu.tree import path_parts, path_str

# A parameter whose path contains one of these words gets no weight decay (any rank).
NO_DECAY_PATTERN = re.compile(r"(^|[/_.])(norm|ln|layernorm|rmsnorm|bias|biases|scale)($|[/_.\d])",
                              re.IGNORECASE)


def make_schedule(trainer_section: Any, total_steps: int | None = None,
                  updates_per_step: int = 1) -> optax.Schedule:
    """The learning rate as a function of the update count (0-based), per config.trainer, whose
    steps and warm-up steps count trainer steps of ``updates_per_step`` updates each."""
    c = trainer_section
    total = int(total_steps if total_steps is not None else c.steps) * updates_per_step
    peak = float(c.learning_rate)
    warmup = int(c.warmup_steps) * updates_per_step
    end = peak * float(c.min_lr_ratio)
    if c.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif c.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps=max(1, total - warmup),
                                           alpha=float(c.min_lr_ratio))
    elif c.schedule == "linear":
        main = optax.linear_schedule(peak, end, transition_steps=max(1, total - warmup))
    else:
        raise ValueError(f"config.trainer.schedule: unknown schedule {c.schedule!r}")
    if warmup == 0:
        return main
    # Warm-up reaches the peak at step `warmup` (the first update uses peak / warmup).
    ramp = optax.linear_schedule(peak / warmup, peak, transition_steps=warmup - 1) if warmup > 1 \
        else optax.constant_schedule(peak)
    return optax.join_schedules([ramp, main], boundaries=[warmup])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: rank >= 2 and not a norm/bias by name."""

    def decays(path, leaf) -> bool:
        name = path_str(path)
        return getattr(leaf, "ndim", 0) >= 2 and not NO_DECAY_PATTERN.search(name)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(trainer_section: Any, total_steps: int | None = None, updates_per_step: int = 1
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns ``(optimizer, schedule_fn)`` from config.trainer.

    ``schedule_fn(count)`` is the learning rate used by the ``count``-th update (log it as
    ``lr``). ``total_steps`` overrides ``trainer.steps`` as the schedule length; each step is
    ``updates_per_step`` optimizer updates (config.rl.ppo_epochs x config.rl.mini_batches).
    """
    c = trainer_section
    schedule = make_schedule(c, total_steps, updates_per_step)
    parts = []
    if float(c.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(c.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(c.b1), b2=float(c.b2), eps=float(c.eps),
                             weight_decay=float(c.weight_decay), mask=decay_mask))
    return optax.chain(*parts), schedule


def opt_state_shardings(optimizer: optax.GradientTransformation, params_abstract: Any) -> Any:
    """Shardings for ``optimizer.init(params)``: moments like their parameter, the rest replicated.

    ``params_abstract`` has leaves with ``.shape``, ``.dtype`` and ``.sharding`` (sharded arrays or
    ``jax.ShapeDtypeStruct(..., sharding=...)``). An optimizer-state leaf whose tree path ends with
    a parameter's path and has its shape gets that parameter's sharding (this sees through
    ``optax.masked``, ``chain`` and named tuples); scalars such as step counts are replicated.
    """
    param_leaves = jax.tree_util.tree_flatten_with_path(params_abstract)[0]
    if not param_leaves:
        raise ValueError("opt_state_shardings: params_abstract has no leaves")
    by_path: dict[tuple[str, ...], Any] = {}
    replicated = None
    for path, leaf in param_leaves:
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            raise ValueError(f"opt_state_shardings: parameter {jax.tree_util.keystr(path)} has no "
                             "sharding (pass jax.ShapeDtypeStruct(shape, dtype, sharding=...))")
        by_path[path_parts(path)] = leaf
        if replicated is None:
            replicated = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) \
                else sharding
    state_abstract = jax.eval_shape(optimizer.init, params_abstract)

    def pick(path, leaf):
        names = path_parts(path)
        for start in range(len(names)):
            param = by_path.get(names[start:])
            if param is not None and tuple(param.shape) == tuple(leaf.shape):
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, state_abstract)
