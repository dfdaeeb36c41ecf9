"""The rollout path: multi-turn episodes in one engine sequence (retain / extend: later turns
prefill only their new tokens), environment turns rendered once between the sampled turns, the
re-tokenization check, limits, infrastructure failures masked, and one-step tasks."""

from __future__ import annotations

import numpy as np
import pytest

from inference_worker.engine import Engine, SamplingParams
from inference_worker.rollout import EpisodeGroup, Rollouts
from rlax_tpu.config import load_config
from rlax_tpu.envs import EnvTurnRenderer, Episode
from tests.helpers.chatml import chatml_tokenizer
from tests.helpers.episodes import ScriptedEnv, eos_often_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = chatml_tokenizer(str(tmp_path_factory.mktemp("tok")))
    config = load_config("configs/arith_grpo.py:smoke", {
        "model.vocab_size": tok.vocab_size, "model.hidden_size": 32, "model.intermediate_size": 64,
        "model.num_layers": 1, "env.max_turns": 6, "env.max_total_tokens": 200})
    model, cfg = eos_often_model(config.model, tok.eos_id)
    engine = Engine(model, cfg, max_batch=4, max_seq_len=160, max_prefill_batch=4, decode_chunk=4,
                    max_decode_chunk=16, page_size=8, num_pages=0)
    return config, tok, engine


def _groups(tok, runner, n=4, max_new_tokens=12, seeds=(1, 2)):
    env = ScriptedEnv(runner.config)
    out = []
    for s in seeds:
        problem = env.train_problems(1, s)[0]
        out.append(EpisodeGroup(problem.to_dict(), runner.prompt(problem),
                                SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, n=n, seed=s,
                                               stop_token_ids=(tok.eos_id,))))
    return out


def _segments(mask):
    """[(value, start, end)] runs of the loss mask."""
    edges = [0] + [i for i in range(1, len(mask)) if mask[i] != mask[i - 1]] + [len(mask)]
    return [(int(mask[a]), a, b) for a, b in zip(edges, edges[1:], strict=False)]


def test_multi_turn_episodes_are_the_sampled_turns_and_env_deltas_rendered_once(setup):
    config, tok, engine = setup
    runner = Rollouts(config, engine, tok, make_env=lambda: ScriptedEnv(config, tool_turns=2))
    groups = _groups(tok, runner)
    before = engine.stats["prefill_tokens"]
    out = runner.run(groups)
    prefilled = engine.stats["prefill_tokens"] - before
    assert engine.pages_in_use == 0  # every retained sequence released
    multi = 0
    expect_prefill = sum(len(g.prompt) for g in groups)  # the prompt once per group: its samples share it
    for rollouts in out:
        assert len(rollouts) == 4
        for r in rollouts:
            segs = _segments(r.loss_mask)
            assert segs[0][0] == 1 and segs[-1][0] == 1  # starts and ends with a model turn
            env_segs = [(a, b) for v, a, b in segs if v == 0]
            for k, (a, b) in enumerate(env_segs, start=1):
                want = f"\n<|im_start|>tool\nresult {k}<|im_end|>\n<|im_start|>assistant\n"
                assert r.tokens[a:b].tolist() == tok.encode(want)  # rendered once, appended as is
                assert r.tokens[a - 1] == tok.eos_id  # the turn before ended on the sampled EOS
                assert np.all(r.logprobs[a:b] == 0.0)
                expect_prefill += (b - a) + 1  # only the new tokens (and the last sampled one)
            model = r.loss_mask == 1
            # sampled tokens carry their behavior log-probs (a near-certain EOS rounds to 0)
            assert np.all(r.logprobs[model] <= 0.0) and np.all(r.logprobs[model & (r.tokens != tok.eos_id)] < 0.0)
            assert r.finish_reason in ("eos", "length")  # the last turn ended on EOS, or was cut
            if r.details.get("reason") == "scripted":  # the environment ended it: after 2 tool turns
                assert len(env_segs) == 2 and r.reward == 1.0 and r.details["correct"]
                multi += 1
            else:  # a turn before was cut (max_new_tokens): the episode ends there, unsolved
                assert r.finish_reason == "length" and r.reward == 0.0 and len(env_segs) < 2
            assert r.details["turns"] == len(env_segs) + 1 and not r.masked
            assert r.details["env_tokens"] == int((~model).sum()) and r.details["model_tokens"] == int(model.sum())
    assert multi >= 2
    assert prefilled == expect_prefill  # later turns prefill only their new tokens
    mismatched = [(g, r) for g, group in zip(groups, out, strict=True) for r in group
                  if r.details["token_mismatches"] > 0]
    assert mismatched  # random sampled bytes: decoding and re-encoding them gives other ids
    for g, r in mismatched:
        # Replayed turn by turn, the episode is the rollout's; re-tokenizing the conversation is not.
        env = ScriptedEnv(config)
        ep = Episode(EnvTurnRenderer(tok), g.prompt, env.reset(g.problem))
        for v, a, b in _segments(r.loss_mask):
            if v:
                ep.add_model_turn(r.tokens[a:b].tolist(), r.logprobs[a:b].tolist())
            else:
                ep.add_env_turn(env.step(ep.last_turn_text)[0])
        assert ep.tokens == r.tokens.tolist()
        assert ep.fresh_tokens() != ep.prompt + ep.tokens
        assert ep.mismatches() == r.details["token_mismatches"]


def test_the_same_request_twice_gives_the_same_episodes(setup):
    config, tok, engine = setup
    runner = Rollouts(config, engine, tok, make_env=lambda: ScriptedEnv(config, tool_turns=1))
    a = runner.run(_groups(tok, runner, n=2, seeds=(5,)))
    b = runner.run(_groups(tok, runner, n=2, seeds=(5,)))
    for x, y in zip(a[0], b[0], strict=True):
        assert x.tokens.tolist() == y.tokens.tolist() and x.loss_mask.tolist() == y.loss_mask.tolist()
    assert a[0][0].tokens.tolist() != a[0][1].tokens.tolist()  # the group's episodes differ


def test_limits_end_episodes_with_finish_reason_length(setup):
    config, tok, engine = setup
    tight = load_config("configs/arith_grpo.py:smoke", {"env.max_total_tokens": 10})
    runner = Rollouts(tight, engine, tok, make_env=lambda: ScriptedEnv(tight, tool_turns=50))
    for r in [r for g in runner.run(_groups(tok, runner, n=2, max_new_tokens=8)) for r in g]:
        assert r.finish_reason == "length" and r.reward == 0.0 and not r.masked
        assert r.details["turns"] == 1  # past the budget after the first environment turn
    # The engine's max_seq_len: an endless tool loop stops when the sequence is full (turns end
    # on EOS or run into the end of the cache; a reply that no longer fits is not appended).
    runner = Rollouts(config, engine, tok, make_env=lambda: ScriptedEnv(config, tool_turns=50))
    runner.limits = type(runner.limits)(50, 10_000, 30.0)
    groups = _groups(tok, runner, n=2, max_new_tokens=engine.max_seq_len)
    delta = len(tok.encode("\n<|im_start|>tool\nresult 10<|im_end|>\n<|im_start|>assistant\n"))
    for r in runner.run(groups)[0]:
        assert r.finish_reason == "length" and r.details["turns"] > 2
        assert engine.max_seq_len - delta - 1 <= len(groups[0].prompt) + len(r.tokens) <= engine.max_seq_len
    assert engine.pages_in_use == 0


@pytest.mark.parametrize("how", ["masked", "fail"])
def test_an_infrastructure_failure_masks_the_sample(setup, how):
    config, tok, engine = setup
    runner = Rollouts(config, engine, tok, make_env=lambda: ScriptedEnv(config, tool_turns=0, **{how: True}))
    out = runner.run(_groups(tok, runner, n=2, seeds=(3,)))
    for r in out[0]:
        assert r.masked and r.details["masked"] is True and r.reward == 0.0
        assert len(r.tokens) > 0 and not r.loss_mask.any()  # kept for the record, trained on nothing
        if how == "fail":
            assert "the tool host is gone" in r.details["infra_error"]
        sample = r.sample(weights_step=3)
        assert sample.loss_mask.sum() == 0 and sample.reward_details["masked"]
    assert runner.counters["masked"] == 2
    assert engine.pages_in_use == 0


def test_one_step_task_rewards_are_batched_and_match_the_task(setup, monkeypatch):
    config, tok, engine = setup
    runner = Rollouts(config, engine, tok)
    assert runner.one_step
    calls = []
    real = runner.task.rewards
    monkeypatch.setattr(runner.task, "rewards", lambda ps, cs: calls.append(len(cs)) or real(ps, cs))
    problems = runner.problems("eval", 3, seed=0)
    groups = [EpisodeGroup(p.to_dict(), runner.prompt(p), SamplingParams(
        temperature=1.0, max_new_tokens=6, n=2, seed=i, stop_token_ids=(tok.eos_id,))) for i, p in enumerate(problems)]
    assert groups[0].prompt == tok.encode_prompt(problems[0].prompt)  # as the controller renders it
    out = runner.run(groups)
    assert sum(calls) == 6 and len(calls) < 6  # scored together, not one by one
    for p, group in zip(problems, out, strict=True):
        for r in group:
            assert r.loss_mask.all() and r.details["turns"] == 1 and r.finish_reason in ("eos", "length")
            want = runner.task.reward(p, tok.decode(r.tokens.tolist()))
            assert (r.reward, r.details["correct"]) == (want.score, want.correct)
