"""Sequence packing: the packed layout, and packed and padded batches train identically (RL with
a value head and a KL reference, SFT, mini-batch updates) under micro-batches on a sharded mesh."""

import jax
import ml_collections
import numpy as np
import pytest

from rlax_tpu import models, rl, sharding
from rlax_tpu.models import ModelConfig
from rlax_tpu.replay.records import RolloutGroup, Sample, Task
from trainer import batching
from trainer import learner as learner_lib
from trainer.learner import Learner, LearnerSpec, to_host
from trainer.optim import make_optimizer
from trainer.replay_controller import Admitted
from trainer.state import create_state

GROUP, GROUPS, SEQ, VOCAB, PACK = 4, 2, 24, 64, 40


def _groups(rng):
    out = []
    for g in range(GROUPS):
        prompt = rng.integers(1, VOCAB, int(rng.integers(3, 8))).astype(np.int32)
        samples = []
        for _ in range(GROUP):
            toks = rng.integers(1, VOCAB, int(rng.integers(2, 14))).astype(np.int32)
            lps = rng.uniform(-5, -1, len(toks)).astype(np.float32)
            samples.append(Sample(toks, lps, 0, float(rng.random()), {}, "length" if len(toks) > 10 else "stop"))
        task = Task(f"t{g}", f"p{g}", prompt, {}, GROUP, g, 0)
        out.append(Admitted(task, RolloutGroup(task.task_id, tuple(samples), "w", {}), 0))
    return out


def test_pack_layout_segments_positions_and_index_map():
    host = batching.rl_batch(_groups(np.random.default_rng(0)), SEQ)
    lengths = host["segment_ids"].sum(1)
    for pack_len, parts, multiple in ((0, 1, 1), (0, 2, 2), (PACK, 1, 1), (PACK, 2, 2), (64, 2, 1)):
        p = batching.pack(host, pack_len, parts, multiple)
        rows, width = p["tokens"].shape
        assert width == (pack_len or SEQ) and rows % (parts * multiple) == 0
        if pack_len == 0:
            assert rows == len(lengths)  # one sample per row: the unpacked layout
        else:
            assert p["segment_ids"].astype(bool).sum() == lengths.sum() and rows < len(lengths)
        per = len(lengths) // parts
        for i, n in enumerate(lengths):
            part = i // per
            flat = {k: p[k][part * rows // parts:(part + 1) * rows // parts].ravel() for k in batching.MODEL_KEYS}
            at = p["pack_index"][i, :n]
            np.testing.assert_array_equal(flat["tokens"][at], host["tokens"][i, :n])
            np.testing.assert_array_equal(flat["targets"][at], host["targets"][i, :n])
            np.testing.assert_array_equal(flat["positions"][at], np.arange(n))  # RoPE restarts
            assert len(set(flat["segment_ids"][at])) == 1 and flat["segment_ids"][at][0] > 0
        assert set(p) - set(host) == {"pack_index"}
    with pytest.raises(batching.BatchError, match="pack_len"):
        batching.pack(host, int(lengths.max()) - 1, 1, 1)
    # Row counts are bucketed: many batches, few shapes.
    shapes = {batching.pack(batching.rl_batch(_groups(np.random.default_rng(s)), SEQ), PACK, 1, 1)["tokens"].shape
              for s in range(30)}
    assert len(shapes) <= batching.MAX_ROW_BUCKETS


def _setup(c, pack_len, with_value):
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 2, "tensor": 1}),
                              devices=jax.devices()[:2])
    model_cfg = ModelConfig.from_config(c.model)
    optimizer, _ = make_optimizer(c.trainer, updates_per_step=c.rl.ppo_epochs * c.rl.mini_batches)
    state, layout = create_state(models.init(model_cfg, 0, mesh=mesh), model_cfg, mesh, optimizer, seed=0,
                                 with_value_head=with_value)
    spec = LearnerSpec(micro_batches=c.trainer.micro_batches, logprob_chunk=24, remat=False, compute_entropy=True,
                       temperature=c.inference.temperature, ppo_epochs=c.rl.ppo_epochs, mini_batches=c.rl.mini_batches,
                       pack_len=pack_len)
    return Learner(mesh, layout, optimizer, spec, rl.build_loss(c.rl)), state


def _tiny(c):
    c.model.vocab_size = VOCAB
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
    c.model.num_heads, c.model.num_kv_heads = 4, 2
    c.rl.group_size = GROUP
    c.trainer.micro_batches = 2
    return c


def _close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b)


def test_packed_and_padded_rl_batches_give_the_same_loss_and_gradients():
    """arith_ppo (value head, KL reference, token-mean loss, overlong filter on), 2 micro-batches
    on fsdp=2: proximal log-probs, values, reference log-probs, advantages and the loss's gradients."""
    from configs.arith_ppo import get_config

    c = _tiny(get_config("smoke"))
    c.rl.overlong_filter = True
    host = batching.rl_batch(_groups(np.random.default_rng(1)), SEQ)
    host.pop("weights_steps")
    mask = host["mask"]
    out = {}
    for pack_len in (0, PACK):
        learner, state = _setup(c, pack_len, with_value=True)
        batch = learner.place(host)
        assert batch["tokens"].shape[1] == (pack_len or SEQ)
        batch["proximal_logp"], batch["old_values"] = learner.recompute(state["params"], batch)
        batch["ref_logp"] = learner.ref_logprobs(jax.tree.map(lambda x: x * 0.9, state["params"]["model"]), batch)
        batch = learner.with_advantages(batch)

        def loss(params, batch=batch, learner=learner):
            logp, ent, values = learner_lib._model_forward(
                learner.layout.graphdef, params["model"], batch, learner.spec, learner.layout.compute_dtype,
                learner.layout.value_graphdef,
                params["value"], return_entropy=True, parts=learner.spec.micro_batches)
            return rl.build_loss(c.rl)(logp, batch, values=values, entropy=ent)[0]

        grads = jax.jit(jax.grad(loss))(state["params"])
        seen = {k: to_host(batch[k])[mask] for k in ("proximal_logp", "old_values", "ref_logp", "advantages")}
        out[pack_len] = seen, to_host(grads)
    (s0, g0), (s1, g1) = out.values()
    _close(s0, s1)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(g0))
    _close(g0, g1)


def test_packed_and_padded_sft_and_mini_batch_updates_agree():
    """SFT (sft_step) and an RL batch in 2 mini-batch updates (each mini-batch packs its own
    samples, selected on the device), 2 micro-batches each: the same loss and gradient norm packed
    and padded."""
    from configs.arith_grpo import get_config

    c = _tiny(get_config("smoke"))
    c.rl.kl_coef = 0.0
    c.rl.ppo_epochs, c.rl.mini_batches = 1, 2
    c.trainer.learning_rate = 1e-4
    rng = np.random.default_rng(2)
    pairs = [(rng.integers(1, VOCAB, int(rng.integers(2, 9))).tolist(),
              rng.integers(1, VOCAB, int(rng.integers(1, 14))).tolist()) for _ in range(8)]
    sft_host = batching.sft_batch(pairs, SEQ)
    host = batching.rl_batch(_groups(np.random.default_rng(3)), SEQ)
    host.pop("weights_steps")
    out = {}
    for pack_len in (0, PACK):
        learner, state = _setup(c, pack_len, with_value=False)
        state, sft = learner.sft_step(state, learner.place(sft_host))
        batch = learner.place(host)
        batch["proximal_logp"] = learner.recompute(state["params"], batch)[0]
        _, m = learner.rl_update(state, learner.with_advantages(batch), seed=0, host=host)
        assert m["updates"] == 2
        out[pack_len] = to_host(sft), m
    (sft0, m0), (sft1, m1) = out.values()
    _close(sft0, sft1)
    _close({k: m0[k] for k in ("loss", "grad_norm", "entropy")}, {k: m1[k] for k in ("loss", "grad_norm", "entropy")})
