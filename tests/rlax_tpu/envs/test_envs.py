"""Environments driven by scripted model turns (no model): episodes, limits, malformed calls."""

from __future__ import annotations

import pytest

from rlax_tpu import envs
from rlax_tpu.config import ConfigError, get_base_config, validate
from rlax_tpu.envs import ToolCall, format_call
from rlax_tpu.sandbox import SandboxPool
from tests.rlax_tpu.sandbox.usable import needs_bwrap


def words(text: str) -> int:
    return len(text.split())


def config(name: str, **env):
    c = get_base_config()
    c.env.name = name
    for k, v in env.items():
        c.env[k] = v
    c.sandbox.cpu_seconds, c.sandbox.wall_seconds = 1, 3.0
    validate(c)
    return c


def call(name: str, **arguments) -> str:
    return format_call(ToolCall(name, arguments))



@pytest.fixture(scope="module")
def pool():
    c = get_base_config()
    c.sandbox.cpu_seconds, c.sandbox.wall_seconds = 1, 3.0
    with SandboxPool.from_config(c.sandbox) as p:
        yield p


def test_task_is_a_one_step_environment():
    c = config("")
    env = envs.make_env(c, words)
    assert isinstance(env, envs.TaskEnv)
    p = env.train_problems(1, seed=0)[0]
    messages = env.reset(p)
    assert messages == [{"role": "user", "content": p.prompt}]
    new, reward, done, info = env.step(f"#### {p.answer}")
    assert (new, reward, done, info["correct"], info["masked"]) == ([], 1.0, True, True, False)
    env.reset(p)
    assert env.step("#### not it")[1] == 0.0


def test_kb_qa_multi_hop_episode():
    c = config("kb_qa")
    c.task.min_difficulty = c.task.difficulty = 3
    env = envs.make_env(c, words)
    p = env.train_problems(1, seed=3)[0]
    kb, path = p.meta["kb"], p.meta["path"]
    assert len(path) == 3 and kb  # three hops
    msgs = env.reset(p)
    assert msgs[0]["role"] == "system" and "lookup" in msgs[0]["content"] and msgs[1]["content"] == p.prompt
    assert env.tool_schemas()[0]["function"]["name"] == "lookup"
    # follow the chain one lookup per turn, reading each answer from the tool's reply
    entity = next(k for k in kb if k in p.prompt)
    for rel in path:
        new, reward, done, info = env.step(f"I need {entity}.\n" + call("lookup", entity=entity.lower()))
        assert not done and reward == 0.0 and new[0]["role"] == "tool"
        reply = new[0]["content"]
        assert reply.startswith(entity)
        entity = reply.split(f"{rel} = ")[1].split(";")[0]
    _, reward, done, info = env.step(f"#### {entity}")
    assert done and reward == 1.0 and info["correct"] and info["turns"] == 4 and info["tool_calls"] == 3
    assert info["malformed_calls"] == 0
    env.reset(p)
    assert env.step("#### Nobody")[1] == 0.0


def test_malformed_and_refused_calls_are_answered_not_fatal():
    env = envs.make_env(config("kb_qa"), words)
    p = env.train_problems(1, seed=0)[0]
    env.reset(p)
    new, _, done, info = env.step('<tool_call>{"name": "lookup", "arguments": {"entity": </tool_call>')
    assert not done and info["malformed_calls"] == 1
    assert new[0]["content"].startswith("Error: the tool call is not valid JSON")
    new, _, done, info = env.step(call("search", q="x") + call("lookup", who="x") + call("lookup", entity=3)
                                  + call("lookup", entity="x", who="y"))
    assert not done and info["tool_errors"] == 4
    assert "unknown tool 'search'" in new[0]["content"]
    assert "missing required argument(s) ['entity']" in new[1]["content"]
    assert "must be of type string" in new[2]["content"] and "no argument(s) ['who']" in new[3]["content"]
    new, _, done, info = env.step(call("lookup", entity="Nobody Here"))
    assert "No entry" in new[0]["content"]
    _, reward, done, info = env.step(f"#### {p.answer}")
    assert done and reward == 1.0 and info["turns"] == 4 and info["malformed_calls"] == 1


def test_turn_and_token_limits_end_the_episode():
    env = envs.make_env(config("kb_qa", max_turns=2), words)
    p = env.train_problems(1, seed=0)[0]
    env.reset(p)
    assert not env.step(call("lookup", entity="a"))[2]
    _, reward, done, info = env.step(call("lookup", entity="b"))
    assert done and reward == 0.0 and info["details"]["reason"] == "max_turns"
    with pytest.raises(RuntimeError):
        env.step("#### x")
    env = envs.make_env(config("kb_qa", max_total_tokens=30), words)
    env.reset(p)
    _, _, done, info = env.step(call("lookup", entity="a"), num_tokens=29)
    assert done and info["truncated"] and info["details"]["reason"] == "max_total_tokens"


def test_env_config_is_validated():
    c = get_base_config()
    c.env.name = "chess"
    with pytest.raises(ConfigError, match="env.name"):
        validate(c)
    c = get_base_config()
    c.env.max_turns = 0
    with pytest.raises(ConfigError, match="env.max_turns"):
        validate(c)


def test_splits_are_disjoint_and_reproducible():
    env = envs.make_env(config("kb_qa"), words)
    train = {p.prompt_id for p in env.train_problems(50, seed=0)}
    held = {p.prompt_id for p in env.eval_problems(20, seed=0)}
    assert not train & held and len(held) == 20
    assert [p.prompt for p in env.train_problems(3, seed=1)] == [p.prompt for p in env.train_problems(3, seed=1)]


@needs_bwrap
def test_tool_arith_with_the_python_tool(pool):
    c = config("tool_arith")
    env = envs.make_env(c, words, pool=pool)
    p = env.train_problems(1, seed=0)[0]
    expr = p.meta["expression"]
    assert all(len(t) in (3, 4) for t in expr.split() if t.isdigit())
    env.reset(p)
    new, reward, done, info = env.step("Let me compute it.\n" + call("python", code=f"print({expr})"))
    assert not done and new == [{"role": "tool", "content": p.answer}]
    _, reward, done, info = env.step(f"The result is {int(p.answer):,}.\n#### {p.answer}")
    assert done and reward == 1.0 and info["correct"] and info["tool_calls"] == 1 and info["tool_seconds"] > 0
    env.reset(p)
    new, *_ = env.step(call("python", code="while True: pass"))
    assert "[timeout]" in new[0]["content"]
    _, reward, _, info = env.step(f"#### {int(p.answer) + 1}")
    assert reward == 0.0 and not info["correct"]


@needs_bwrap
def test_tool_time_budget(pool):
    env = envs.make_env(config("tool_arith", max_tool_seconds=0.01), words, pool=pool)
    env.reset(env.train_problems(1, seed=0)[0])
    first, *_ = env.step(call("python", code="print(1)"))
    second, _, _, info = env.step(call("python", code="print(2)"))
    assert first[0]["content"] == "1" and "budget" in second[0]["content"] and info["tool_errors"] == 1


def test_tool_infra_failure_masks_the_episode():
    dead = SandboxPool.from_config(get_base_config().sandbox)
    dead.shutdown()
    env = envs.make_env(config("tool_arith"), words, pool=dead)
    p = env.train_problems(1, seed=0)[0]
    env.reset(p)
    new, _, done, info = env.step(call("python", code="print(1)"))
    assert not done and "unavailable" in new[0]["content"]
    _, reward, done, info = env.step(f"#### {p.answer}")
    assert done and info["masked"]


def run_reference(env, problem):
    env.reset(problem)
    turns = env.reference_turns(problem)
    for i, turn in enumerate(turns):
        new, reward, done, info = env.step(turn)
        assert done == (i == len(turns) - 1), (i, new)
    return reward, info


def test_reference_turns_solve_kb_qa_and_the_task_adapter():
    c = config("kb_qa")
    env = envs.make_env(c, words)
    for p in env.train_problems(10, seed=5) + env.eval_problems(5, seed=5):
        reward, info = run_reference(env, p)
        assert reward == 1.0 and info["tool_calls"] == len(p.meta["path"]) and info["malformed_calls"] == 0
    task_env = envs.make_env(config(""), words)
    for p in task_env.train_problems(5, seed=0):
        assert run_reference(task_env, p)[0] == 1.0


@needs_bwrap
def test_reference_turns_solve_tool_arith(pool):
    env = envs.make_env(config("tool_arith"), words, pool=pool)
    for p in env.train_problems(4, seed=7):
        reward, info = run_reference(env, p)
        assert reward == 1.0 and info["tool_calls"] == 1
