"""The policy-landed check: log-probs of fixed canary tokens under the weights as published.

With every version the trainer publishes the log-probs of ``store.canary_prompts`` fixed token
sequences (``store.canary_tokens`` long) under its weights cast to ``store.publish_dtype``,
in the version's manifest (``canary``: tokens, logprobs). After every weight swap a worker scores
the same tokens under the weights its engine holds and compares; a difference beyond
``store.canary_tolerance`` is a PolicyNotLandedError in its log and a counter in its heartbeat,
which the trainer sums into its metrics (``canary/*``). Both sides compute in float32 from the
publish-dtype values with the same model code, so a landed policy agrees to float rounding and
the tolerance can be far below what one training step moves.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlax_tpu import store_layout
from rlax_tpu.models import ModelConfig, Transformer, init_rngs

# The canary tokens' seed: fixed, so every version of a run scores the same sequences.
TOKEN_SEED = 0x5EED
# Counters a worker keeps in its heartbeat (ReplayWorker.counters) and the trainer sums.
CHECKED, FAILED = "canary_checked", "canary_failed"


class PolicyNotLandedError(RuntimeError):
    """A worker's weights do not give the log-probs the trainer published for that version."""

    def __init__(self, version: int, max_diff: float, tolerance: float, detail: str = ""):
        self.version, self.max_diff, self.tolerance = version, max_diff, tolerance
        super().__init__(f"PolicyNotLandedError: version {version}: canary max |dlogp| {max_diff:.3g} > "
                         f"tolerance {tolerance:.3g}{detail}")


def canary_tokens(num_prompts: int, num_tokens: int, vocab_size: int) -> np.ndarray:
    """[num_prompts, num_tokens] int32 token ids, the same for every version of a run."""
    return np.random.default_rng(TOKEN_SEED).integers(0, vocab_size, (num_prompts, num_tokens), np.int32)


@functools.lru_cache(maxsize=4)
def _scorer(model_cfg: ModelConfig, publish_dtype: str, out_sharding):
    cfg = model_cfg.replace(dtype="float32", param_dtype="float32")
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=init_rngs(0))))
    published = jnp.dtype(publish_dtype)

    def as_published(x):
        # Floating leaves exactly as the param server stores them (the publish's own cast), then
        # widened: float32 compute keeps both sides' rounding far below the tolerance.
        if jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(published).astype(jnp.float32)
        return x

    def score(params, tokens):
        model = nnx.merge(graphdef, jax.tree.map(as_published, params))
        return model.target_logprobs(tokens[:, :-1], tokens[:, 1:])

    return jax.jit(score, out_shardings=out_sharding)


def logprobs(model_cfg: ModelConfig, params: Any, tokens: np.ndarray, publish_dtype: str) -> np.ndarray:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) [P, T-1] (float32, on the host) under ``params``
    (the model's pure dict, any dtype and sharding) as published in ``publish_dtype``."""
    leaves = jax.tree.leaves(params)
    mesh = getattr(getattr(leaves[0], "sharding", None), "mesh", None)
    out = None
    if isinstance(mesh, jax.sharding.Mesh):  # replicated result: readable on every host
        out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    fn = _scorer(model_cfg, publish_dtype, out)
    return np.asarray(jax.device_get(fn(params, jnp.asarray(tokens, jnp.int32))), np.float32)


def figures(store_cfg, model_cfg: ModelConfig, params: Any) -> dict | None:
    """The manifest's ``canary`` record for ``params`` (None with store.canary_prompts = 0)."""
    if not store_cfg.canary_prompts:
        return None
    tokens = canary_tokens(store_cfg.canary_prompts, store_cfg.canary_tokens, model_cfg.vocab_size)
    lp = logprobs(model_cfg, params, tokens, store_cfg.publish_dtype)
    return {"tokens": tokens.tolist(), "logprobs": lp.tolist(), "publish_dtype": store_cfg.publish_dtype}


def compare(record: dict, got: np.ndarray, version: int, tolerance: float) -> float:
    """max |published - got|; raises PolicyNotLandedError beyond ``tolerance``."""
    want = np.asarray(record["logprobs"], np.float32)
    if want.shape != got.shape:
        raise PolicyNotLandedError(version, float("inf"), tolerance,
                                   f" (published {want.shape} log-probs, scored {got.shape})")
    diff = np.abs(want - got)
    worst = float(np.nanmax(diff)) if np.isfinite(diff).all() else float("inf")
    if not worst <= tolerance:
        i = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(diff), diff, np.inf))), diff.shape)
        raise PolicyNotLandedError(version, worst, tolerance,
                                   f" (prompt {i[0]}, token {i[1] + 1}: published {want[i]:.5f}, "
                                   f"worker {got[i]:.5f})")
    return worst


def fleet_metrics(kv) -> dict[str, float]:
    """``canary/checked`` and ``canary/failed`` summed over every worker's heartbeat (each
    incarnation's counts since it started), and ``canary/workers_failing``."""
    checked = failed = failing = 0
    for key, entry in kv.iter_values(store_layout.WORKERS):
        try:
            hb = store_layout.Heartbeat.decode(entry.value, key[len(store_layout.WORKERS):])
        except store_layout.HeartbeatError:
            continue
        checked += int(hb.counters.get(CHECKED, 0))
        failed += int(hb.counters.get(FAILED, 0))
        failing += int(hb.counters.get(FAILED, 0) > 0)
    return {"canary/checked": checked, "canary/failed": failed, "canary/workers_failing": failing}
