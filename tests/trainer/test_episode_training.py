"""Training on episodes: environment tokens carry no loss (for every aggregation and with
micro-batches), masked samples are left out, and the trainer's recompute of a multi-turn
rollout equals the engine's behavior log-probs on the model's tokens (f32, on-policy)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlax_tpu import rl, sharding
from rlax_tpu.models import ModelConfig
from rlax_tpu.replay.records import RolloutGroup, Sample, Task
from tests.helpers.rl import settings
from trainer import batching
from trainer.learner import Learner, LearnerSpec, rl_grads, to_host
from trainer.optim import make_optimizer
from trainer.replay_controller import Admitted
from trainer.state import create_state

GROUP, SEQ = 4, 48


def _episode(rng, vocab):
    """A model turn, an environment turn, a model turn: tokens, log-probs, loss mask."""
    a, e, b = (int(rng.integers(2, 6)) for _ in range(3))
    tokens = rng.integers(1, vocab, a + e + b).astype(np.int32)
    mask = np.array([1] * a + [0] * e + [1] * b, np.uint8)
    return tokens, np.where(mask == 1, -2.0, 0.0).astype(np.float32), mask


def _groups(rng, vocab, groups=2, masked=()):
    out = []
    for g in range(groups):
        samples = []
        for j in range(GROUP):
            tokens, logp, mask = _episode(rng, vocab)
            if (g, j) in masked:
                mask = np.zeros_like(mask)
            samples.append(Sample(tokens, logp, 0, float(rng.random()), {}, "eos", mask))
        task = Task(f"t{g:04d}", f"p{g}", rng.integers(1, vocab, 5).astype(np.int32), {}, GROUP, g, 0)
        out.append(Admitted(task, RolloutGroup(task.task_id, tuple(samples), "w", {}), 0))
    return out


def test_rl_batch_masks_environment_tokens_and_sizes_rows_by_episode_length():
    rng = np.random.default_rng(0)
    groups = _groups(rng, 50, masked={(1, 2)})
    host = batching.rl_batch(groups, SEQ)
    s = groups[0].group.samples[0]
    p, n = len(groups[0].task.prompt_tokens), len(s.tokens)
    assert host["segment_ids"][0].sum() == p + n  # the row holds the prompt and the whole episode
    assert host["mask"][0, p - 1:p + n - 1].tolist() == s.loss_mask.astype(bool).tolist()
    assert host["mask"].sum() == sum(int(x.loss_mask.sum()) for a in groups for x in a.group.samples)
    assert host["sample_mask"].tolist() == [True] * 6 + [False] + [True]  # the masked sample is no row


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_environment_tokens_get_no_gradient_in_any_aggregation(agg):
    rng = np.random.default_rng(1)
    host = batching.rl_batch(_groups(rng, 50, masked={(0, 1)}), SEQ)
    loss = rl.build_loss(settings(loss_agg=agg, group_size=GROUP))
    batch = rl.with_advantages(loss.settings, {k: jnp.asarray(v) for k, v in host.items()})
    grad = jax.grad(lambda logp: loss(logp, batch)[0])(jnp.asarray(rng.normal(size=host["mask"].shape), jnp.float32))
    grad = np.asarray(grad)
    assert np.abs(grad[host["mask"]]).sum() > 0
    assert np.all(grad[~host["mask"]] == 0.0)  # environment, prompt, padding and masked samples
    # The masked sample is out of its group's statistics too: its advantages are 0.
    assert np.all(np.asarray(batch["advantages"])[1] == 0.0)


def _learner(c, mesh, model):
    model_cfg = ModelConfig.from_config(c.model)
    optimizer, _ = make_optimizer(c.trainer)
    state, layout = create_state(model, model_cfg, mesh, optimizer, seed=0, with_value_head=False)
    spec = LearnerSpec(micro_batches=c.trainer.micro_batches, logprob_chunk=c.model.logprob_chunk, remat=False,
                       compute_entropy=False, temperature=c.inference.temperature, ppo_epochs=1, mini_batches=1,
                       pack_len=c.trainer.pack_len)
    return Learner(mesh, layout, optimizer, spec, rl.build_loss(c.rl)), state, model_cfg


def _config(vocab, **rl_fields):
    from configs.arith_grpo import get_config

    c = get_config("smoke")
    c.model.vocab_size = vocab
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
    c.model.num_heads, c.model.num_kv_heads = 4, 2
    c.rl.group_size, c.rl.kl_coef = GROUP, 0.0
    c.inference.max_seq_len = SEQ
    for k, v in rl_fields.items():
        c.rl[k] = v
    return c


def _mesh():
    return sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 8, "tensor": 1}))


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_environment_targets_change_no_gradient_of_the_model(micro_batches):
    from rlax_tpu import models

    c = _config(50)
    c.trainer.micro_batches = micro_batches
    mesh = _mesh()
    learner, state, model_cfg = _learner(c, mesh, models.init(ModelConfig.from_config(c.model), 0, mesh=mesh))
    rng = np.random.default_rng(2)
    host = {k: v for k, v in batching.rl_batch(_groups(rng, 50), SEQ).items() if k != "weights_steps"}
    other = dict(host)
    env = ~host["mask"] & (host["segment_ids"] != 0)  # every non-loss position of the rows
    other["targets"] = np.where(env, (host["targets"] + 7) % 50, host["targets"]).astype(np.int32)
    assert (other["targets"] != host["targets"]).any()
    grads = jax.jit(functools.partial(rl_grads, layout=learner.layout, spec=learner.spec,
                                      loss=rl.build_loss(c.rl)))
    out = []
    for h in (host, other):
        batch = learner.with_advantages({**learner.place(h), "proximal_logp": jnp.asarray(h["behavior_logp"])})
        out.append(to_host(grads(state["params"], batch)[0]))
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(out[0])) > 0


@pytest.mark.slow
def test_recompute_of_multi_turn_rollouts_equals_the_engines_logprobs_on_model_tokens(tmp_path):
    """Episodes from the rollout path (model turns, tool turns rendered once, model turns):
    the trainer's proximal log-probs of the whole row equal the engine's behavior log-probs on
    every model token (f32, 1e-4), and the PPO ratio is 1 before the first update."""
    from flax import nnx

    from inference_worker.engine import Engine, SamplingParams
    from inference_worker.rollout import EpisodeGroup, Rollouts
    from rlax_tpu import models
    from tests.helpers.chatml import chatml_tokenizer
    from tests.helpers.episodes import ScriptedEnv, eos_often

    tok = chatml_tokenizer(str(tmp_path))
    c = _config(tok.vocab_size, off_policy="tis", is_cap=2.0)
    c.inference.temperature = 0.8
    mesh = _mesh()
    model = eos_often(models.init(ModelConfig.from_config(c.model), 0, mesh=mesh), tok.eos_id)
    learner, state, model_cfg = _learner(c, mesh, model)
    params = jax.device_put(to_host(state["params"]["model"]), jax.devices()[0])
    engine = Engine(nnx.merge(learner.layout.graphdef, params), model_cfg, max_batch=8, max_seq_len=SEQ,
                    max_prefill_batch=8, decode_chunk=4, max_decode_chunk=16, page_size=8, num_pages=0)
    runner = Rollouts(c, engine, tok, make_env=lambda: ScriptedEnv(c, tool_turns=1))
    env = ScriptedEnv(c)
    admitted = []
    for g, problem in enumerate(env.train_problems(2, seed=4)):
        prompt = runner.prompt(problem)
        (rollouts,) = runner.run([EpisodeGroup(problem.to_dict(), prompt, SamplingParams(
            temperature=0.8, max_new_tokens=6, n=GROUP, seed=g, stop_token_ids=(tok.eos_id,)))])
        task = Task(f"t{g:04d}", problem.prompt_id, np.asarray(prompt, np.int32), {}, GROUP, g, 0)
        admitted.append(Admitted(task, RolloutGroup(task.task_id, tuple(r.sample(0) for r in rollouts), "w", {}), 0))
    host = {k: v for k, v in batching.rl_batch(admitted, SEQ).items() if k != "weights_steps"}
    inside = (host["segment_ids"] != 0) & ~host["mask"]
    assert host["mask"].sum() > 20 and any(0 in s.loss_mask for a in admitted for s in a.group.samples)
    assert inside.sum() > sum(len(a.task.prompt_tokens) for a in admitted) * GROUP  # environment turns too
    batch = learner.place(host)
    batch["proximal_logp"] = learner.recompute(state["params"], batch)[0]
    prox = to_host(batch["proximal_logp"])
    mask = host["mask"]
    np.testing.assert_allclose(prox[mask], host["behavior_logp"][mask], atol=1e-4, rtol=0)
    _, m = learner.rl_step(state, learner.with_advantages(batch))
    m = to_host(m)
    for k in ("is_weight_mean", "ratio_mean", "ratio_max"):
        assert m[k] == pytest.approx(1.0, abs=1e-4), k
