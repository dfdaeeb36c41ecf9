"""The SFT loss against a hand computation: the masked next-token NLL of the answer tokens from
the model's full logits, and its gradient, with one and two micro-batches of unequal token counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rlax_tpu import models, sharding
from rlax_tpu.models import ModelConfig
from trainer import batching
from trainer.learner import Learner, LearnerSpec, to_host
from trainer.optim import make_optimizer
from trainer.state import create_state

VOCAB, SEQ = 64, 16


def _hand_nll(model, b) -> jax.Array:
    """-sum(mask * log softmax(logits)[target]) / sum(mask), from the [B, T, V] logits."""
    logits = model(b["tokens"], b["positions"], b["segment_ids"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), b["targets"][..., None], -1)[..., 0]
    mask = b["mask"].astype(jnp.float32)
    return -(logp * mask).sum() / mask.sum()


def test_sft_step_is_the_masked_nll_of_the_answer_tokens():
    from configs.arith_grpo import get_config

    c = get_config("smoke")
    c.model.vocab_size = VOCAB
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                              devices=jax.devices()[:1])
    model_cfg = ModelConfig.from_config(c.model)
    model = models.init(model_cfg, 0, mesh=mesh)
    rng = np.random.default_rng(0)
    # Answer lengths differ between the two halves: micro-batches hold unequal token counts.
    pairs = [(rng.integers(1, VOCAB, 4).tolist(), rng.integers(1, VOCAB, n).tolist()) for n in (9, 7, 2, 1)]
    host = batching.sft_batch(pairs, SEQ)
    b = {k: jnp.asarray(v) for k, v in host.items()}
    graphdef, params = nnx.split(model)
    hand, grads = jax.jit(jax.value_and_grad(lambda p: _hand_nll(nnx.merge(graphdef, p), b)))(params)
    hand_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))

    assert host["mask"].sum() == 19 and float(hand) > 1.0

    optimizer, _ = make_optimizer(c.trainer)
    for micro_batches in (1, 2):
        fresh = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))  # the step donates its state
        state, layout = create_state(fresh, model_cfg, mesh, optimizer, seed=0,
                                     with_value_head=False)
        spec = LearnerSpec(micro_batches=micro_batches, logprob_chunk=16, remat=False, compute_entropy=False,
                           temperature=1.0, ppo_epochs=1, mini_batches=1, pack_len=0)
        learner = Learner(mesh, layout, optimizer, spec, loss=None)
        _, metrics = learner.sft_step(state, learner.place(host))
        m = to_host(metrics)
        np.testing.assert_allclose(m["sft/nll"], float(hand), rtol=1e-5, err_msg=f"{micro_batches=}")
        np.testing.assert_allclose(m["grad_norm"], hand_norm, rtol=1e-4, err_msg=f"{micro_batches=}")


def test_sft_dtype_runs_the_warm_start_in_its_own_compute_dtype():
    """model.dtype=bfloat16 with sft.dtype=float32: the SFT step's NLL is the float32 model's
    (the activations follow the rebuilt graphdef, not only the weights' cast), not the bf16 one."""
    from configs.arith_grpo import get_config
    from trainer.bootstrap import sft_layout

    c = get_config("smoke")
    c.model.vocab_size = VOCAB
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                              devices=jax.devices()[:1])
    rng = np.random.default_rng(1)
    host = batching.sft_batch([(rng.integers(1, VOCAB, 4).tolist(), rng.integers(1, VOCAB, 8).tolist())
                               for _ in range(4)], SEQ)
    optimizer, _ = make_optimizer(c.trainer)
    spec = LearnerSpec(micro_batches=1, logprob_chunk=16, remat=False, compute_entropy=False,
                       temperature=1.0, ppo_epochs=1, mini_batches=1, pack_len=0)
    nll = {}
    for dtype, sft_dtype in (("float32", ""), ("bfloat16", ""), ("bfloat16", "float32")):
        c.model.dtype, c.sft.dtype = dtype, sft_dtype
        model_cfg = ModelConfig.from_config(c.model)
        state, layout = create_state(models.init(model_cfg, 0, mesh=mesh), model_cfg, mesh, optimizer, seed=0,
                                     with_value_head=False)
        layout = sft_layout(c, model_cfg, layout)
        assert nnx.merge(layout.graphdef, state["params"]["model"]).cfg.dtype == (sft_dtype or dtype)
        learner = Learner(mesh, layout, optimizer, spec, loss=None)
        nll[dtype, sft_dtype] = float(to_host(learner.sft_step(state, learner.place(host))[1])["sft/nll"])
    assert nll["bfloat16", "float32"] == nll["float32", ""]
    assert nll["bfloat16", ""] != nll["float32", ""]
