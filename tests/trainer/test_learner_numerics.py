"""The learner's numerics: bf16 compute over f32 master weights, log-probs under the sampling
temperature (engine == trainer on-policy), and micro-batches that give the whole batch's
gradients for every aggregation, with and without the overlong filter."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlax_tpu import models, rl, sharding
from rlax_tpu.models import ModelConfig
from rlax_tpu.replay.records import RolloutGroup, Sample, Task
from trainer import batching
from trainer.learner import Learner, LearnerSpec, rl_grads, sft_grads, to_host
from trainer.optim import make_optimizer
from trainer.replay_controller import Admitted
from trainer.state import create_state

GROUP, GROUPS, SEQ, VOCAB = 4, 2, 24, 64


def _config(**model):
    from configs.arith_grpo import get_config

    c = get_config("smoke")
    c.model.vocab_size = VOCAB
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
    c.model.num_heads, c.model.num_kv_heads = 4, 2
    for k, v in model.items():
        c.model[k] = v
    c.rl.group_size = GROUP
    c.rl.kl_coef = 0.0
    c.trainer.warmup_steps = 0
    return c


def _one_device():
    return sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                              devices=jax.devices()[:1])


def _learner(c, temperature=1.0, micro_batches=1):
    mesh = _one_device()
    model_cfg = ModelConfig.from_config(c.model)
    optimizer, _ = make_optimizer(c.trainer)
    state, layout = create_state(models.init(model_cfg, 0, mesh=mesh), model_cfg, mesh, optimizer, seed=0,
                                 with_value_head=False)
    spec = LearnerSpec(micro_batches=micro_batches, logprob_chunk=24, remat=False, compute_entropy=True,
                       temperature=temperature)
    return Learner(mesh, layout, optimizer, spec, rl.build_loss(c.rl)), state, model_cfg


def _groups(rng, completions=None, truncated=()):
    """Admitted groups of random (or the given) completions; rows in ``truncated`` end by length."""
    out = []
    for g in range(GROUPS):
        prompt = rng.integers(1, VOCAB, 5).astype(np.int32)
        samples = []
        for j in range(GROUP):
            if completions is None:
                toks, lps = rng.integers(1, VOCAB, int(rng.integers(2, 14))), None
            else:
                prompt, (toks, lps) = completions[g][0], completions[g][1][j]
            lps = rng.normal(-3.0, 0.5, len(toks)) if lps is None else lps
            reason = "length" if g * GROUP + j in truncated else "stop"
            samples.append(Sample(np.asarray(toks, np.int32), np.asarray(lps, np.float32), 0, float(rng.random()),
                                  {}, reason))
        task = Task(f"t{g:04d}", f"p{g}", np.asarray(prompt, np.int32), {}, GROUP, g, 0)
        out.append(Admitted(task, RolloutGroup(task.task_id, tuple(samples), "w", {}), 0))
    return out


def _placed(learner, host):
    return learner.place({k: v for k, v in host.items() if k != "weights_steps"})


def _floating_dtypes(tree):
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bf16_compute_keeps_f32_masters_and_one_adamw_step_at_1e6_moves_them():
    """bf16 compute: the params and Adam moments are f32 and one step at lr 1e-6 changes more
    than 99% of the master weights; the same update on bf16 weights would round most away."""
    c = _config(dtype="bfloat16")
    c.trainer.learning_rate = 1e-6
    learner, state, model_cfg = _learner(c)
    assert model_cfg.param_dtype == "float32" and learner.layout.compute_dtype == jnp.bfloat16
    assert _floating_dtypes(state["params"]) == {jnp.dtype(jnp.float32)}
    assert _floating_dtypes(state["opt_state"]) == {jnp.dtype(jnp.float32)}
    before = to_host(state["params"])
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(1, VOCAB, 5).tolist(), rng.integers(1, VOCAB, 12).tolist()) for _ in range(8)]
    state, m = learner.sft_step(state, learner.place(batching.sft_batch(pairs, SEQ)))
    after = to_host(state["params"])
    assert np.isfinite(float(m["sft/nll"])) and _floating_dtypes(state["opt_state"]) == {jnp.dtype(jnp.float32)}
    old = np.concatenate([x.ravel() for x in jax.tree.leaves(before)])
    new = np.concatenate([x.ravel() for x in jax.tree.leaves(after)])
    assert new.dtype == np.float32
    assert np.mean(new != old) > 0.99
    old16 = old.astype(jnp.bfloat16)
    assert np.mean((old16 + (new - old).astype(jnp.bfloat16)) != old16) < 0.1


def test_bf16_forward_and_rl_step_on_cpu():
    """The bf16 forward is close to the f32 one from the same masters (f32 log-probs) but not
    equal to it (it does run in bf16); an RL step under it trains the f32 masters."""
    rng = np.random.default_rng(1)
    host = batching.rl_batch(_groups(rng), SEQ)
    out = {}
    for dtype in ("float32", "bfloat16"):
        learner, state, _ = _learner(_config(dtype=dtype))
        batch = _placed(learner, host)
        batch["proximal_logp"] = learner.recompute(state["params"], batch)[0]
        out[dtype] = to_host(batch["proximal_logp"])
        start = to_host(state["params"])
        state, m = learner.rl_step(state, learner.with_advantages(batch))
        m = to_host(m)
        assert np.isfinite(m["loss"]) and m["grad_norm"] > 0 and abs(m["ratio_mean"] - 1) < 1e-2
        assert _floating_dtypes(state["params"]) == {jnp.dtype(jnp.float32)}
        moved = max(float(np.abs(a - b).max())
                    for a, b in zip(jax.tree.leaves(to_host(state["params"])), jax.tree.leaves(start), strict=True))
        assert moved > 1e-6
    assert out["bfloat16"].dtype == np.float32
    diff = np.abs(out["bfloat16"] - out["float32"])[host["mask"]]
    assert 1e-5 < diff.max() < 0.1


def test_engine_logprobs_at_temperature_equal_trainer_proximal_and_ratio_is_one():
    """Sampling at temperature 0.7: the engine's behavior log-probs (what the worker records)
    equal the trainer's proximal log-probs at the same temperature (f32, 1e-4) and both the
    off-policy weight and the PPO ratio are 1 before the first update; at temperature 1 the
    trainer's log-probs would describe another distribution."""
    from flax import nnx

    from inference_worker.engine import Engine, SamplingParams

    temp = 0.7
    c = _config()
    c.rl.off_policy, c.rl.is_cap = "tis", 2.0
    c.inference.temperature = temp
    learner, state, model_cfg = _learner(c, temperature=temp)
    params = jax.device_put(to_host(state["params"]["model"]), jax.devices()[0])
    engine = Engine(nnx.merge(learner.layout.graphdef, params), model_cfg, max_batch=8, max_seq_len=SEQ,
                    decode_chunk=4)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, VOCAB, n).tolist() for n in (5, 7)]
    outs = engine.generate(prompts, [SamplingParams(temperature=temp, n=GROUP, max_new_tokens=14, seed=s)
                                     for s in (1, 2)])
    completions = [(p, [(o.tokens, o.logprobs) for o in g]) for p, g in zip(prompts, outs, strict=True)]
    host = batching.rl_batch(_groups(rng, completions), SEQ)
    mask = host["mask"]
    assert mask.sum() > 40
    batch = _placed(learner, host)
    batch["proximal_logp"] = learner.recompute(state["params"], batch)[0]
    prox = to_host(batch["proximal_logp"])
    np.testing.assert_allclose(prox[mask], host["behavior_logp"][mask], atol=1e-4, rtol=0)
    _, m = learner.rl_step(state, learner.with_advantages(batch))
    m = to_host(m)
    for k in ("is_weight_mean", "is_weight_max", "ratio_mean", "ratio_max"):
        assert m[k] == pytest.approx(1.0, abs=1e-4), k
    untempered, _, _ = _learner(c, temperature=1.0)
    raw = to_host(untempered.recompute(state["params"], batch)[0])
    assert np.abs(raw - host["behavior_logp"])[mask].max() > 1e-2


_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@functools.lru_cache(maxsize=1)
def _accumulation_setup():
    c = _config()
    learner, state, _ = _learner(c)
    # Uneven lengths, and truncated rows placed so that the filter empties some micro-batch rows.
    host = batching.rl_batch(_groups(np.random.default_rng(11), truncated=(0, 1, 5)), SEQ)
    batch = _placed(learner, host)
    batch["proximal_logp"] = learner.recompute(state["params"], batch)[0] + 0.05
    batch["ref_logp"] = batch["proximal_logp"] - 0.1
    return c, learner, state, batch


@pytest.mark.parametrize("loss_agg", _AGGS)
def test_micro_batches_give_the_whole_batch_gradients(loss_agg):
    """1, 2 and 4 micro-batches: the same gradients (1e-5) and metrics for every aggregation,
    overlong filter on and off (KL, entropy and off-policy terms in the loss)."""
    c, learner, state, batch = _accumulation_setup()
    for overlong in (False, True):
        c.rl.loss_agg, c.rl.overlong_filter = loss_agg, overlong
        c.rl.kl_coef, c.rl.entropy_coef, c.rl.off_policy = 0.1, 0.01, "tis"
        loss = rl.build_loss(c.rl)
        full = learner.with_advantages(batch)
        got = {}
        for m in (1, 2, 4):
            spec = LearnerSpec(micro_batches=m, logprob_chunk=24, remat=False, compute_entropy=True,
                               temperature=1.0)
            fn = jax.jit(functools.partial(rl_grads, layout=learner.layout, spec=spec, loss=loss))
            got[m] = to_host(fn(state["params"], full))
        grads1, mets1 = got[1]
        assert float(np.abs(np.concatenate([g.ravel() for g in jax.tree.leaves(grads1)])).max()) > 1e-4
        for m in (2, 4):
            grads, mets = got[m]
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), grads, grads1)
            assert set(mets) == set(mets1)
            for k, v in mets1.items():
                assert mets[k] == pytest.approx(v, abs=1e-5, rel=1e-5), (loss_agg, overlong, m, k)
        if overlong:
            assert mets1["num_tokens"] < float(to_host(batch["mask"]).sum())


def test_sft_micro_batches_give_the_whole_batch_gradients():
    c = _config()
    learner, state, _ = _learner(c)
    rng = np.random.default_rng(2)
    pairs = [(rng.integers(1, VOCAB, 4).tolist(), rng.integers(1, VOCAB, int(n)).tolist())
             for n in (1, 2, 16, 3, 15, 2, 9, 1)]
    batch = learner.place(batching.sft_batch(pairs, SEQ))
    got = {}
    for m in (1, 2, 4):
        spec = LearnerSpec(micro_batches=m, logprob_chunk=24, remat=False, compute_entropy=False, temperature=1.0)
        got[m] = to_host(jax.jit(functools.partial(sft_grads, layout=learner.layout, spec=spec))(state["params"],
                                                                                                    batch))
    for m in (2, 4):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), got[m][0], got[1][0])
        assert got[m][1]["sft/tokens"] == got[1][1]["sft/tokens"] == float(to_host(batch["mask"]).sum())
        assert got[m][1]["sft/nll"] == pytest.approx(got[1][1]["sft/nll"], abs=1e-5)
