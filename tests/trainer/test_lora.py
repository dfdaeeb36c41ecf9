"""LoRA in the learner: the optimizer holds adapter state only, the base never changes, the KL
reference is the base (zero adapters), and a checkpoint of adapters + optimizer resumes exactly."""

from __future__ import annotations

import jax
import numpy as np

from rlax_tpu import models, rl
from rlax_tpu.models import LoraSpec, ModelConfig
from tests.trainer.test_learner import SEQ, _config, _groups, _mesh
from trainer import batching
from trainer.checkpointing import Checkpointer
from trainer.learner import Learner, LearnerSpec
from trainer.optim import make_optimizer
from trainer.state import abstract_state, create_state

SPEC = LoraSpec(2, 4.0, ("q", "k", "v", "o", "gate", "up", "down"), 0.0)


def _lora_learner(c, mesh, lora_spec=SPEC):
    model_cfg = ModelConfig.from_config(c.model)
    model = models.init(model_cfg, 0, mesh=mesh)
    optimizer, _ = make_optimizer(c.trainer)
    state, layout = create_state(model, model_cfg, mesh, optimizer, seed=0, with_value_head=False, lora_spec=lora_spec)
    spec = LearnerSpec(micro_batches=c.trainer.micro_batches, logprob_chunk=c.model.logprob_chunk,
                       remat=False, compute_entropy=True, temperature=c.inference.temperature,
                       ppo_epochs=1, mini_batches=1, pack_len=c.trainer.pack_len)
    return Learner(mesh, layout, optimizer, spec, rl.build_loss(c.rl)), state


def _step(learner, state, host, ref=None):
    batch = learner.place({k: v for k, v in host.items() if k != "weights_steps"})
    batch = learner.prepare(state["params"], batch, ref, state["base"])
    prox, _ = learner.recompute(state["params"], batch, state["base"])
    np.testing.assert_array_equal(np.asarray(prox), np.asarray(batch["proximal_logp"]))
    return learner.rl_step(state, batch)


def test_adapters_train_base_frozen_and_checkpoint_resumes(tmp_path):
    c = _config()
    c.rl.kl_coef = 0.1  # the reference is the frozen base: zero adapters over it
    mesh = _mesh(2, 2, 2)
    learner, state = _lora_learner(c, mesh)
    base0 = jax.tree.map(np.asarray, state["base"])
    adapter_leaves = jax.tree.leaves(state["params"])
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "ndim", 0) > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in adapter_leaves)  # Adam's mu, nu only
    assert all(x.dtype == np.float32 for x in adapter_leaves)
    ref = jax.tree.map(jax.numpy.zeros_like, state["params"]["model"])
    hosts = [batching.rl_batch(_groups(np.random.default_rng(s)), SEQ) for s in range(3)]
    state, m = _step(learner, state, hosts[0], ref)
    assert abs(float(m["kl_ref"])) < 1e-6  # step 0: the policy is the base, so is the reference
    state, m = _step(learner, state, hosts[1], ref)
    assert float(m["kl_ref"]) > 0  # the adapters moved the policy away from the base
    for a, b in zip(jax.tree.leaves(state["base"]), jax.tree.leaves(base0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    ckpt = Checkpointer(str(tmp_path), keep=2, async_save=False)
    saved = {k: v for k, v in state.items() if k != "base"}
    ckpt.save(2, saved)
    ckpt.wait()
    continued, m_cont = _step(learner, state, hosts[2], ref)
    restored, _ = ckpt.restore(2, abstract_state(saved))
    ckpt.close()
    resumed, m_res = _step(learner, {**restored, "base": continued["base"]}, hosts[2], ref)
    assert float(m_res["loss"]) == float(m_cont["loss"])
    for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(continued["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
