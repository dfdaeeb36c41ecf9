"""Episodes for tests: a scripted tool environment and a tiny model that often ends its turn."""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from rlax_tpu import models
from rlax_tpu.envs import Environment
from rlax_tpu.models import ModelConfig
from rlax_tpu.tasks.base import Problem

SYSTEM = "You have a python tool."


class ScriptedEnv(Environment):
    """Answers the first ``tool_turns`` model turns with one tool message each ('result k'), then
    ends the episode with reward 1. ``sleep_s``: each step sleeps (a slow tool); ``masked``: the
    episode ends as an infrastructure failure; ``fail``: step() raises."""

    name = "scripted"

    def __init__(self, config, tool_turns: int = 2, sleep_s: float = 0.0, masked: bool = False,
                 fail: bool = False):
        super().__init__(config, count_tokens=len)
        self.tool_turns, self.sleep_s, self.masked, self.fail = tool_turns, sleep_s, masked, fail

    def train_problems(self, n, seed):
        return [Problem(f"s{seed}-{i}", f"What is {i} + {seed}?", str(i + seed)) for i in range(n)]

    eval_problems = train_problems

    def reset(self, problem):
        self.problem = Problem.from_dict(problem) if isinstance(problem, dict) else problem
        self.turns = 0
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.problem.prompt}]

    def step(self, model_turn, num_tokens=None):
        time.sleep(self.sleep_s)
        if self.fail:
            raise OSError("the tool host is gone")
        self.turns += 1
        info = {"turns": self.turns, "tool_calls": min(self.turns, self.tool_turns), "malformed_calls": 0,
                "tool_errors": 0, "tool_seconds": 0.0, "truncated": False, "masked": False}
        if self.turns <= self.tool_turns:
            return [{"role": "tool", "content": f"result {self.turns}"}], 0.0, False, info
        info.update(correct=True, details={"correct": True, "reason": "scripted"}, masked=self.masked)
        return [], 1.0, True, info


def eos_often(model, eos: int):
    """Makes a random model (in place, each weight keeping its sharding) one whose final norm keeps
    one feature and whose tied embedding reads it for EOS only: EOS is almost certain or almost
    impossible at each step (about half the steps), the other tokens near uniform, so turns are
    short and end on EOS (and decode to odd text). Returns the model."""
    params = nnx.state(model)
    state = nnx.to_pure_dict(params)
    scale, emb = state["norm"]["scale"], state["embed"]
    one = np.zeros(scale.shape, np.float32)
    one[0] = 1.0
    embed = np.array(emb)
    embed[:, 0] = 0.0
    embed[eos, 0] = 500.0  # the residual stream is small in feature 0 (no embedding writes it)
    state["norm"]["scale"] = jax.device_put(one.astype(scale.dtype), scale.sharding)
    state["embed"] = jax.device_put(embed.astype(emb.dtype), emb.sharding)
    nnx.replace_by_pure_dict(params, state)
    nnx.update(model, params)
    return model


def eos_often_model(section, eos: int, seed: int = 0):
    """eos_often of a random model of ``section`` (config.model: its vocab_size the tokenizer's)."""
    cfg = ModelConfig.from_config(section)
    return eos_often(models.init(cfg, seed), eos), cfg
