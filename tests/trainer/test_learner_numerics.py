"""The learner's numerics: bf16 compute over f32 master weights, and micro-batches that give the
whole batch's gradients for every aggregation, with and without the overlong filter (log-probs
under the sampling temperature: tests/trainer/test_learner.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from rlax_tpu import models, rl, sharding
from rlax_tpu.models import ModelConfig
from rlax_tpu.replay.records import RolloutGroup, Sample, Task
from trainer import batching
from trainer.learner import Learner, LearnerSpec, rl_grads, sft_grads, to_host
from trainer.optim import make_optimizer
from trainer.replay_controller import Admitted
from trainer.state import StateLayout, create_state

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


def _learner(c, temperature=1.0, micro_batches=1, init_dtype="float32"):
    """The learner and state of config c (its model initialized with params in ``init_dtype``)."""
    mesh = _one_device()
    model_cfg = ModelConfig.from_config(c.model)
    optimizer, _ = make_optimizer(c.trainer)
    model = models.init(model_cfg.replace(param_dtype=init_dtype), 0, mesh=mesh)
    state, layout = create_state(model, model_cfg, mesh, optimizer, seed=0, with_value_head=False)
    spec = LearnerSpec(micro_batches=micro_batches, logprob_chunk=24, remat=False, compute_entropy=True,
                       temperature=temperature, ppo_epochs=1, mini_batches=1, pack_len=0)
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


def test_bf16_compute_over_f32_masters_and_one_adamw_step_at_1e6_moves_them():
    """bf16 compute: the params and Adam moments are f32 (even from a model built in bf16); the
    bf16 forward is close to the f32 one from the same masters (f32 log-probs) but not equal (it
    does run in bf16); one RL step at
    lr 1e-6 changes more than 99% of the master weights, where the same update on bf16 weights
    would round most away."""
    rng = np.random.default_rng(1)
    host = batching.rl_batch(_groups(rng), SEQ)
    f32_learner, f32_state, _ = _learner(_config(), init_dtype="bfloat16")
    f32_logp = to_host(f32_learner.recompute(f32_state["params"], _placed(f32_learner, host))[0])

    c = _config(dtype="bfloat16")
    c.trainer.learning_rate = 1e-6
    learner, state, model_cfg = _learner(c, init_dtype="bfloat16")
    assert model_cfg.param_dtype == "float32" and learner.layout.compute_dtype == jnp.bfloat16
    assert _floating_dtypes(state["params"]) == {jnp.dtype(jnp.float32)}
    assert _floating_dtypes(state["opt_state"]) == {jnp.dtype(jnp.float32)}
    batch = _placed(learner, host)
    batch["proximal_logp"] = learner.recompute(state["params"], batch)[0]
    logp = to_host(batch["proximal_logp"])
    assert logp.dtype == np.float32
    diff = np.abs(logp - f32_logp)[host["mask"]]
    assert 1e-5 < diff.max() < 0.1

    before = to_host(state["params"])
    state, m = learner.rl_step(state, learner.with_advantages(batch))
    m = to_host(m)
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    assert _floating_dtypes(state["params"]) == _floating_dtypes(state["opt_state"]) == {jnp.dtype(jnp.float32)}
    old = np.concatenate([x.ravel() for x in jax.tree.leaves(before)])
    new = np.concatenate([x.ravel() for x in jax.tree.leaves(to_host(state["params"]))])
    assert np.mean(new != old) > 0.99
    old16 = old.astype(jnp.bfloat16)
    assert np.mean((old16 + (new - old).astype(jnp.bfloat16)) != old16) < 0.1


_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


class _TokenLM(nnx.Module):
    """Next token from the current token's (and position's) embedding: rows independent as in
    the transformer, so equal per-token loss gradients mean equal parameter gradients, and the
    accumulation tests compile in a fraction of the transformer's time."""

    def __init__(self, seed: int):
        k1, k2 = jax.random.split(jax.random.key(seed))
        self.embed = nnx.Param(jax.random.normal(k1, (VOCAB, 16)) * 0.5)
        self.pos = nnx.Param(jax.random.normal(k2, (SEQ, 16)) * 0.1)

    def hidden(self, tokens, positions, segment_ids, *, remat=False, dropout_key=None):
        del segment_ids, remat, dropout_key
        return self.embed[...][tokens] + self.pos[...][positions]

    def output_weight(self):
        return self.embed[...]


def _token_lm():
    graphdef, st = nnx.split(_TokenLM(0))
    return StateLayout(graphdef, None, None, jnp.float32, seed=0), {"model": nnx.to_pure_dict(st)}


def _rl_batch(c, host, m: int):
    """The batch as the learner gets it for m micro-batches (model inputs in m parts, unpacked)."""
    host = batching.pack({k: v for k, v in host.items() if k != "weights_steps"}, 0, m, 1)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    batch["proximal_logp"] = batch["behavior_logp"] + 0.05
    batch["ref_logp"] = batch["behavior_logp"] - 0.1
    return rl.with_advantages(rl.build_loss(c.rl).settings, batch)


def _spec(m: int, entropy: bool = True) -> LearnerSpec:
    return LearnerSpec(micro_batches=m, logprob_chunk=24, remat=False, compute_entropy=entropy, temperature=0.9,
                       ppo_epochs=1, mini_batches=1, pack_len=0)


def test_micro_batches_give_the_whole_batch_gradients():
    """1, 2 and 4 micro-batches: the same gradients (1e-5) and metrics for every aggregation,
    overlong filter on and off (KL, entropy and off-policy terms in the loss). Eager: one small
    program per primitive, shared by the 18 cases, costs less than compiling each case."""
    layout, params = _token_lm()
    # Uneven lengths; truncated rows 0, 1 and 5: the filter empties the first of 4 micro-batches.
    host = batching.rl_batch(_groups(np.random.default_rng(11), truncated=(0, 1, 5)), SEQ)
    c = _config()
    c.rl.kl_coef, c.rl.entropy_coef, c.rl.off_policy = 0.1, 0.01, "tis"
    with jax.disable_jit():
        for loss_agg in _AGGS:
            for overlong in (False, True):
                c.rl.loss_agg, c.rl.overlong_filter = loss_agg, overlong
                loss = rl.build_loss(c.rl)
                got = {m: to_host(rl_grads(params, _rl_batch(c, host, m), layout=layout, spec=_spec(m), loss=loss))
                       for m in (1, 2, 4)}
                grads1, mets1 = got[1]
                assert np.abs(grads1["model"]["embed"]).max() > 1e-4
                for m in (2, 4):
                    grads, mets = got[m]
                    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grads, grads1)
                    assert set(mets) == set(mets1)
                    for k, v in mets1.items():
                        assert mets[k] == pytest.approx(v, abs=1e-5, rel=1e-5), (loss_agg, overlong, m, k)
                tokens = host["mask"].sum() - (host["mask"][[0, 1, 5]].sum() if overlong else 0)
                assert mets1["num_tokens"] == tokens


def test_micro_batch_shares_are_the_aggregations_weights():
    """The shares by hand: token counts for token_mean, valid sequences for the sequence means,
    counted after the overlong filter (an emptied micro-batch weighs 0)."""
    c = _config()
    c.rl.overlong_filter = True
    mask = np.zeros((4, 6), bool)
    mask[0, :2] = mask[1, :4] = mask[2, :1] = mask[3, :5] = True
    batch = {"mask": jnp.asarray(mask), "truncated": jnp.asarray([False, False, False, True])}
    for agg, want in (("token_mean", [6 / 7, 1 / 7]), ("seq_mean_token_mean", [2 / 3, 1 / 3]),
                      ("seq_mean_token_sum_norm", [2 / 3, 1 / 3])):
        c.rl.loss_agg = agg
        shares, tokens = rl.build_loss(c.rl).micro_batch_shares(batch, 2)
        np.testing.assert_allclose(shares, want, rtol=1e-6)
        np.testing.assert_allclose(tokens, [6 / 7, 1 / 7], rtol=1e-6)
    batch["truncated"] = jnp.asarray([False, False, True, True])
    np.testing.assert_allclose(rl.build_loss(c.rl).micro_batch_shares(batch, 2)[0], [1.0, 0.0])


def test_micro_batch_metrics_combine_as_their_names_say():
    per = [{"num_tokens": 3.0, "sft/tokens": 3.0, "ratio_max": 2.0, "adv_min": -1.0, "clip_frac": 0.5, "loss": 1.0},
           {"num_tokens": 1.0, "sft/tokens": 1.0, "ratio_max": 5.0, "adv_min": -4.0, "clip_frac": 1.0, "loss": 3.0},
           {"num_tokens": 0.0, "sft/tokens": 0.0, "ratio_max": 0.0, "adv_min": 0.0, "clip_frac": 0.0, "loss": 0.0}]
    per = [{k: jnp.float32(v) for k, v in p.items()} for p in per]
    out = to_host(rl.combine_micro_metrics(per, jnp.asarray([0.5, 0.5, 0.0]), jnp.asarray([0.75, 0.25, 0.0]),
                                           frozenset({"clip_frac"})))
    assert out == pytest.approx({"num_tokens": 4.0, "sft/tokens": 4.0, "ratio_max": 5.0, "adv_min": -4.0,
                                 "clip_frac": 0.625, "loss": 2.0})


def test_sft_micro_batches_give_the_whole_batch_gradients():
    layout, params = _token_lm()
    rng = np.random.default_rng(2)
    pairs = [(rng.integers(1, VOCAB, 4).tolist(), rng.integers(1, VOCAB, int(n)).tolist())
             for n in (1, 2, 16, 3, 15, 2, 9, 1)]
    host = batching.sft_batch(pairs, SEQ)
    batches = {m: {k: jnp.asarray(v) for k, v in batching.pack(host, 0, m, 1).items()} for m in (1, 2, 4)}
    batch = batches[1]
    with jax.disable_jit():
        got = {m: to_host(sft_grads(params, batches[m], layout=layout, spec=_spec(m, False))) for m in (1, 2, 4)}
    for m in (2, 4):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got[m][0], got[1][0])
        assert got[m][1]["sft/tokens"] == got[1][1]["sft/tokens"] == float(np.asarray(batch["mask"]).sum())
        assert got[m][1]["sft/nll"] == pytest.approx(got[1][1]["sft/nll"], abs=1e-5)
