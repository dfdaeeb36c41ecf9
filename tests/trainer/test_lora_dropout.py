"""LoRA adapter dropout in the learner: it changes the gradient pass only (the proximal and
reference log-probs are those of the same weights without it), its masks are a pure function of
(seed, phase, step, update, micro-batch) so the same step gives the same update twice, and the
train state holds nothing new. The masked forward itself: tests/rlax_tpu/models/test_lora.py."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from rlax_tpu import sharding
from rlax_tpu.models import LoraSpec
from tests.trainer.test_learner import SEQ, _config, _groups
from tests.trainer.test_lora import _lora_learner
from trainer import batching
from trainer.learner import RL_PHASE, dropout_key, to_host

TARGETS = ("v", "down")  # one attention and one MLP projection keep the compiles small


def _one_device():
    """A one-device mesh: what dropout does does not depend on the mesh, and compiles stay cheap."""
    return sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])


def _trained(host_params: dict) -> dict:
    """The adapters moved off B = 0 (there the adapter branch adds nothing, dropped out or not)."""
    rng = np.random.default_rng(7)
    return jax.tree.map(lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(x.dtype), host_params)


def _setup(c, mesh, p: float):
    learner, state = _lora_learner(c, mesh, LoraSpec(2, 4.0, TARGETS, p))
    host = to_host(state)
    host["params"] = _trained(host["params"])
    return learner, host


def _placed(learner, host_state: dict, step: int = 0) -> dict:
    """A fresh device copy of a host state (the steps donate theirs), at trainer step ``step``."""
    return jax.device_put({**host_state, "step": np.int32(step)}, learner.layout.shardings)


def _assert_same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_dropout_changes_the_gradient_pass_only_and_is_deterministic():
    c = _config()
    c.rl.kl_coef = 0.1
    c.trainer.micro_batches = 2  # each micro-batch folds its index into the key
    mesh = _one_device()
    (l0, h0), (l3, h3) = _setup(c, mesh, 0.0), _setup(c, mesh, 0.3)
    assert set(h3) == {"params", "opt_state", "step", "base"}  # no RNG in the state: checkpoints as before
    _assert_same(h0["params"], h3["params"])  # the same adapters either way
    assert dropout_key(l0.layout, RL_PHASE, 0) is None

    host = {k: v for k, v in batching.rl_batch(_groups(np.random.default_rng(0)), SEQ).items()
            if k != "weights_steps"}
    ref = jax.tree.map(np.zeros_like, h0["params"]["model"])
    prepared = {}
    for p, (learner, h) in ((0.0, (l0, h0)), (0.3, (l3, h3))):
        s = _placed(learner, h)
        ref_on = jax.device_put(ref, learner.layout.shardings["params"]["model"])
        prepared[p] = learner.prepare(s["params"], learner.place(host), ref_on, s["base"])
    for key in ("proximal_logp", "ref_logp", "advantages"):  # never dropped out
        np.testing.assert_array_equal(np.asarray(prepared[0.0][key]), np.asarray(prepared[0.3][key]))

    def update(step: int, index: int):
        batch = {**prepared[0.3], "update_index": jax.device_put(np.int32(index), l3.replicated)}
        state, m = l3.rl_step(_placed(l3, h3, step), batch)
        return to_host(state["params"]), to_host(m)

    (first, m), (again, m_again) = update(0, 0), update(0, 0)
    _assert_same(first, again)  # same seed, step and update: the same masks, the same update
    assert float(m["grad_norm"]) == float(m_again["grad_norm"])
    # On-policy (proximal = these weights) the ratio would be exactly 1 without dropout.
    assert float(m["ratio_max"]) > 1.0 + 1e-3
    for other in (update(1, 0)[1], update(0, 1)[1]):  # another step, another update: other masks
        assert abs(float(other["grad_norm"]) - float(m["grad_norm"])) > 1e-4 * float(m["grad_norm"])

    # The SFT warm start's step: the same step draws the same masks, the next one others.
    rng = np.random.default_rng(1)
    pairs = [(list(rng.integers(1, 64, 5)), list(rng.integers(1, 64, 8))) for _ in range(8)]
    sft_batch = l3.place(batching.sft_batch(pairs, SEQ))
    sft = lambda step: to_host(l3.sft_step(_placed(l3, h3, step), sft_batch)[1])  # noqa: E731
    first, again, later = sft(0), sft(0), sft(1)
    assert (float(first["sft/nll"]), float(first["grad_norm"])) == (float(again["sft/nll"]), float(again["grad_norm"]))
    assert abs(float(later["sft/nll"]) - float(first["sft/nll"])) > 1e-6
