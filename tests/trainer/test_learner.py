"""The Learner on 8 fake devices: RL steps under two meshes agree, checkpoints move between
meshes, and on-policy f32 log-probs of the engine equal the trainer's recompute at the sampling
temperature."""

import jax
import ml_collections
import numpy as np
import pytest

from rlax_tpu import models, rl, sharding
from rlax_tpu.models import ModelConfig
from rlax_tpu.replay.records import RolloutGroup, Sample, Task
from trainer import batching
from trainer.checkpointing import Checkpointer
from trainer.learner import Learner, LearnerSpec, to_host
from trainer.optim import make_optimizer
from trainer.replay_controller import Admitted
from trainer.state import abstract_state, create_state

GROUP, GROUPS, SEQ, VOCAB = 4, 2, 32, 64


def _config():
    from configs.arith_grpo import get_config

    c = get_config("smoke")
    c.model.vocab_size = VOCAB
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
    c.model.num_heads, c.model.num_kv_heads = 4, 2
    c.rl.group_size = GROUP
    c.rl.kl_coef = 0.0  # these batches carry no reference log-probs
    c.trainer.learning_rate = 1e-2
    return c


def _mesh(data, fsdp, tensor):
    return sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor}))


def _learner(c, mesh):
    model_cfg = ModelConfig.from_config(c.model)
    model = models.init(model_cfg, 0, mesh=mesh)
    optimizer, _ = make_optimizer(c.trainer)
    state, layout = create_state(model, model_cfg, mesh, optimizer, seed=0, with_value_head=False)
    spec = LearnerSpec(micro_batches=c.trainer.micro_batches, logprob_chunk=c.model.logprob_chunk,
                       remat=False, compute_entropy=True, temperature=c.inference.temperature,
                       ppo_epochs=1, mini_batches=1, pack_len=c.trainer.pack_len)
    return Learner(mesh, layout, optimizer, spec, rl.build_loss(c.rl)), state, model_cfg


def _groups(rng, completions=None, prompt_len=6):
    """Admitted groups: random prompts and completions, or the given (prompts, completions)."""
    out = []
    for g in range(GROUPS):
        prompt = rng.integers(1, VOCAB, prompt_len).astype(np.int32)
        samples = []
        for j in range(GROUP):
            if completions is None:
                toks, lps = rng.integers(1, VOCAB, int(rng.integers(3, 12))), None
            else:
                prompt, (toks, lps) = completions[g][0], completions[g][1][j]
            toks = np.asarray(toks, np.int32)
            lps = np.full(len(toks), -4.0, np.float32) if lps is None else np.asarray(lps, np.float32)
            samples.append(Sample(toks, lps, 0, float(rng.random()), {}, "stop"))
        task = Task(f"t{g:04d}", f"p{g}", np.asarray(prompt, np.int32), {}, GROUP, g, 0)
        out.append(Admitted(task, RolloutGroup(task.task_id, tuple(samples), "w", {}), 0))
    return out


def _step(learner, state, host):
    batch = learner.place({k: v for k, v in host.items() if k != "weights_steps"})
    batch["proximal_logp"] = learner.recompute(state["params"], batch)[0]
    return learner.rl_step(state, learner.with_advantages(batch))


@pytest.mark.slow
def test_rl_step_on_two_meshes_and_checkpoint_across_them(tmp_path):
    assert jax.device_count() == 8
    c = _config()
    host = batching.rl_batch(_groups(np.random.default_rng(0)), SEQ)
    results = {}
    for shape in [(1, 8, 1), (2, 2, 2)]:
        learner, state, _ = _learner(c, _mesh(*shape))
        start = to_host(state["params"])
        state, m = _step(learner, state, host)
        m = to_host(m)
        assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
        results[shape] = (learner, state, start, to_host(state["params"]))
    (_, _, s1, p1), (_, _, s2, p2) = results.values()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), s1, s2)  # same init on both
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(s1), strict=True))
    assert moved > 1e-4  # the step did something
    # Adam's first update is lr * g / (|g| + eps): an element whose gradient is near eps turns the
    # meshes' different f32 reduction orders into ~1e-5 here; a sharding bug moves elements by ~lr.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), p1, p2)

    # Saved under fsdp=8, restored under data=2,fsdp=2,tensor=2 (and on), then one more step each.
    (l8, st8, _, _), (l222, st222, _, _) = results.values()
    with Checkpointer(str(tmp_path), keep=1, async_save=False) as ck:
        assert ck.save(1, st8, {"meta": {"step": 1}})
        restored, items = ck.restore(1, abstract_state(st222), ["meta"])
    assert items["meta"] == {"step": 1}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(st222), strict=True):
        assert a.sharding == b.sharding
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), to_host(restored), to_host(st8))
    host2 = batching.rl_batch(_groups(np.random.default_rng(1)), SEQ)
    after8 = to_host(_step(l8, st8, host2)[0]["params"])
    after222 = to_host(_step(l222, restored, host2)[0]["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), after8, after222)


def test_engine_logprobs_at_temperature_equal_trainer_recompute_on_policy_f32():
    """Sampling at temperature 0.7: the engine's behavior log-probs (what the worker records)
    equal the trainer's proximal log-probs at the same temperature (f32, 1e-4), and the
    off-policy weight and the PPO ratio are 1 before the first update; the untempered log-probs
    of the same tokens are another distribution's."""
    from flax import nnx

    from inference_worker.engine import Engine, SamplingParams

    c = _config()
    c.inference.temperature = 0.7
    c.rl.off_policy, c.rl.is_cap = "tis", 2.0
    assert c.model.dtype == "float32"
    learner, state, model_cfg = _learner(c, _mesh(1, 8, 1))
    assert learner.spec.temperature == 0.7
    params = jax.device_put(to_host(state["params"]["model"]), jax.devices()[0])
    engine = Engine(nnx.merge(learner.layout.graphdef, params), model_cfg, max_batch=8, max_seq_len=SEQ,
                    max_prefill_batch=8, decode_chunk=4, max_decode_chunk=64, page_size=16, num_pages=0)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, VOCAB, n).tolist() for n in (5, 9)]
    outs = engine.generate(prompts, [SamplingParams(temperature=0.7, n=GROUP, max_new_tokens=16, seed=s)
                                     for s in (1, 2)])
    completions = [(p, [(o.tokens, o.logprobs) for o in group]) for p, group in zip(prompts, outs, strict=True)]
    host = batching.rl_batch(_groups(rng, completions), SEQ)
    assert host["mask"].sum() > 40
    batch = learner.place({k: v for k, v in host.items() if k != "weights_steps"})
    batch["proximal_logp"] = learner.recompute(state["params"], batch)[0]
    prox = to_host(batch["proximal_logp"])
    mask = host["mask"]
    np.testing.assert_allclose(prox[mask], host["behavior_logp"][mask], atol=1e-4, rtol=0)
    ratio = np.exp(prox[mask] - host["behavior_logp"][mask])
    _, m = learner.rl_step(state, learner.with_advantages(batch))
    m = to_host(m)
    for k in ("is_weight_mean", "is_weight_max", "ratio_mean", "ratio_max"):
        assert m[k] == pytest.approx(1.0, abs=1e-4), k
    raw = np.concatenate([o.raw_logprobs for g in outs for o in g])
    assert np.abs(raw - np.concatenate([o.logprobs for g in outs for o in g])).max() > 1e-2
    from trainer.run import _mismatch

    same = np.ones(len(host["rewards"]), bool)  # every row generated from these very weights
    assert _mismatch(host, prox, same)["mismatch/max_abs_ratio_minus_1"] == pytest.approx(np.abs(ratio - 1).max())
    # Rows from older weights differ by the policy change too: they are left out of the metric.
    assert _mismatch(host, prox, ~same) == {"mismatch/on_policy_rows": 0}


@pytest.mark.slow
def test_ppo_value_head_and_kl_reference_step_and_micro_batches():
    """arith_ppo: value head + frozen KL reference (kept out of the donated state, as in run.py);
    2 micro-batches give the same update as 1 (token-mean loss, uneven token counts)."""
    from configs.arith_ppo import get_config

    c = get_config("smoke")
    c.model.vocab_size = VOCAB
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
    c.rl.group_size = GROUP  # the synthetic batch's layout; GAE ignores groups
    c.trainer.learning_rate = 1e-2
    assert c.rl.advantage == "gae" and c.rl.kl_coef > 0 and c.rl.loss_agg == "token_mean"
    host = batching.rl_batch(_groups(np.random.default_rng(5)), SEQ)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 2, "tensor": 1}),
                              devices=jax.devices()[:2])
    out = {}
    for m in (1, 2):
        c.trainer.micro_batches = m
        model_cfg = ModelConfig.from_config(c.model)
        model = models.init(model_cfg, 0, mesh=mesh)
        optimizer, _ = make_optimizer(c.trainer)
        state, layout = create_state(model, model_cfg, mesh, optimizer, seed=0, with_value_head=True)
        spec = LearnerSpec(micro_batches=m, logprob_chunk=64, remat=False, compute_entropy=True, temperature=1.0,
                           ppo_epochs=1, mini_batches=1, pack_len=0)
        learner = Learner(mesh, layout, optimizer, spec, rl.build_loss(c.rl))
        ref = jax.tree.map(lambda x: x.copy(), state["params"]["model"])
        batch = learner.place({k: v for k, v in host.items() if k != "weights_steps"})
        batch["proximal_logp"], batch["old_values"] = learner.recompute(state["params"], batch)
        batch["ref_logp"] = learner.ref_logprobs(ref, batch)
        state, metrics = learner.rl_step(state, learner.with_advantages(batch))
        metrics = to_host(metrics)
        assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        out[m] = to_host(state["params"])
    assert set(out[1]) == {"model", "value"}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), out[1], out[2])


def test_update_schedule_makes_the_policy_losses_differ_and_the_clip_act():
    """One batch through the real schedule (2 epochs x 2 mini-batches, proximal log-probs fixed
    before the first update): ppo, gspo, cispo and reinforce share the first (on-policy) update,
    then their ratios move and their updates part; the clip acts."""
    from trainer.learner import combine_metrics, mini_batch_groups

    c = _config()
    c.rl.ppo_epochs, c.rl.mini_batches = 2, 2
    c.rl.loss_agg = "seq_mean_token_mean"
    c.trainer.learning_rate = 3e-2
    host = batching.rl_batch(_groups(np.random.default_rng(7)), SEQ)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 2, "tensor": 1}),
                              devices=jax.devices()[:2])
    after, metrics = {}, {}
    for name in ("ppo", "gspo", "cispo", "reinforce"):
        c.rl.policy_loss = name
        c.rl.clip_eps_low, c.rl.clip_eps_high = (3e-4, 4e-4) if name == "gspo" else (0.2, 0.2)
        model_cfg = ModelConfig.from_config(c.model)
        optimizer, _ = make_optimizer(c.trainer, updates_per_step=4)
        state, layout = create_state(models.init(model_cfg, 0, mesh=mesh), model_cfg, mesh, optimizer, seed=0,
                                     with_value_head=False)
        spec = LearnerSpec(micro_batches=1, logprob_chunk=64, remat=False, compute_entropy=True, temperature=1.0,
                           ppo_epochs=2, mini_batches=2, pack_len=0)
        learner = Learner(mesh, layout, optimizer, spec, rl.build_loss(c.rl))
        batch = learner.place({k: v for k, v in host.items() if k != "weights_steps"})
        batch["proximal_logp"] = learner.recompute(state["params"], batch)[0]
        state, m = learner.rl_update(state, learner.with_advantages(batch), seed=0, host=host)
        assert m["updates"] == 4 and int(to_host(state["step"])) == 1  # one trainer step of 4 updates
        after[name], metrics[name] = to_host(state["params"]["model"]), m
    flat = {k: np.concatenate([x.ravel() for x in jax.tree.leaves(v)]) for k, v in after.items()}
    names = sorted(flat)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(flat[a] - flat[b]).max() > 1e-6, (a, b)
    assert metrics["ppo"]["clip_frac"] > 0 and metrics["ppo"]["approx_kl"] > 0
    assert metrics["reinforce"]["clip_frac"] == 0  # no clip in the vanilla policy gradient
    # The schedule: each epoch covers every group once; later epochs reorder them.
    spec = LearnerSpec(1, 64, False, False, 1.0, ppo_epochs=3, mini_batches=2, pack_len=0)
    groups = mini_batch_groups(8, spec, seed=1)
    assert len(groups) == 6 and all(sorted(np.concatenate(groups[e * 2:e * 2 + 2])) == list(range(8))
                                    for e in range(3))
    assert combine_metrics([{"a_max": 1.0, "b": 1.0}, {"a_max": 3.0, "b": 2.0}]) == \
        {"a_max": 3.0, "b": 1.5, "updates": 2}


def test_reused_groups_are_trained_with_their_importance_weights():
    """A reused group carries the behavior log-probs stored when it was generated (an older
    policy): the trainer's off-policy weight pi_prox / pi_behavior for its tokens is not 1, while
    fresh on-policy rows weigh 1."""
    import dataclasses

    from flax import nnx

    from inference_worker.engine import Engine, SamplingParams

    c = _config()
    c.rl.off_policy, c.rl.is_cap = "tis", 2.0
    learner, state, model_cfg = _learner(c, _mesh(1, 8, 1))
    params = jax.device_put(to_host(state["params"]["model"]), jax.devices()[0])
    engine = Engine(nnx.merge(learner.layout.graphdef, params), model_cfg, max_batch=8, max_seq_len=SEQ,
                    max_prefill_batch=8, decode_chunk=4, max_decode_chunk=64, page_size=16, num_pages=0)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, VOCAB, 6).tolist() for _ in range(GROUPS)]
    outs = engine.generate(prompts, [SamplingParams(temperature=1.0, n=GROUP, max_new_tokens=10, seed=s)
                                     for s in range(GROUPS)])
    fresh = _groups(rng, [(p, [(o.tokens, o.raw_logprobs) for o in g]) for p, g in zip(prompts, outs, strict=True)])
    older = [[(o.tokens, np.asarray(o.raw_logprobs) - 0.4) for o in g] for g in outs]  # an older policy's
    reused = _groups(rng, [(p, o) for p, o in zip(prompts, older, strict=True)])
    reused = [dataclasses.replace(a, reused=True, staleness=3) for a in reused]

    def metrics(groups):
        host = batching.rl_batch(groups, SEQ)
        batch = learner.place({k: v for k, v in host.items() if k != "weights_steps"})
        batch["proximal_logp"] = learner.recompute(state["params"], batch)[0]
        return to_host(learner.rl_step(jax.tree.map(lambda x: x.copy(), state), learner.with_advantages(batch))[1])

    assert metrics(fresh)["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    m = metrics([fresh[0], reused[1]])
    assert m["is_weight_max"] > 1.3 and m["is_weight_mean"] > 1.0 + 1e-3
