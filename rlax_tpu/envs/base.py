"""The environment interface: one episode at a time, driven by the model's turns.

    messages = env.reset(problem)                       # [{'role', 'content'}, ...]
    new_messages, reward, done, info = env.step(model_turn)

A multi-turn environment answers each tool call in the turn with a 'tool' message (an error
text for a malformed call or a refused one) and ends the episode at a turn without calls (the
final answer, scored), or at a limit (turns, tokens; env section). info carries the episode's
counters (turns, tool_calls, malformed_calls, tool_errors, tool_seconds), and at the end
'correct', 'details' (the reward's) and 'masked': True when the infrastructure failed (the
sandbox could not run a verifier), so the sample is left out of training instead of scored 0.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from rlax_tpu.envs.tool_calls import ParsedTurn, parse_tool_calls
from rlax_tpu.envs.tools import Toolbox, ToolError
from rlax_tpu.tasks.base import Problem, Reward, Task

Message = dict[str, str]
StepOut = tuple[list[Message], float, bool, dict]


@dataclasses.dataclass(frozen=True)
class EnvLimits:
    """Per-episode limits; the values live in config.env."""

    max_turns: int
    max_total_tokens: int
    max_tool_seconds: float

    @classmethod
    def from_config(cls, section) -> EnvLimits:
        if "env" in section:
            section = section.env
        return cls(int(section.max_turns), int(section.max_total_tokens), float(section.max_tool_seconds))


class Infra(Exception):
    """A tool or verifier could not run for the infrastructure's reasons (the sample is masked)."""


class Environment:
    """Base class: problems (train/eval splits) plus reset/step over one episode."""

    name = "env"

    def __init__(self, config, count_tokens: Callable[[str], int]):
        self.config = config
        self.limits = EnvLimits.from_config(config)
        self.count_tokens = count_tokens
        self.problem: Problem | None = None

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        raise NotImplementedError

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        raise NotImplementedError

    def tool_schemas(self) -> list[dict]:
        """Tools for chat templates that take them; [] for none."""
        return []

    def reset(self, problem: Problem | dict) -> list[Message]:
        raise NotImplementedError

    def step(self, model_turn: str, num_tokens: int | None = None) -> StepOut:
        """num_tokens: the turn's sampled token count when known (else count_tokens(model_turn))."""
        raise NotImplementedError

    def reference_turns(self, problem: Problem) -> list[str] | None:
        """The model turns of a solved episode, in order (tool replies do not change them): SFT
        traces and scripted tests. None when the problem has no reference (user code problems)."""
        raise NotImplementedError


class TaskEnv(Environment):
    """A single-turn task as a one-step environment: the first turn is the answer."""

    def __init__(self, config, task: Task, count_tokens: Callable[[str], int]):
        super().__init__(config, count_tokens)
        self.task = task
        self.name = task.name

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        return self.task.train_problems(n, seed)

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        return self.task.eval_problems(n, seed)

    def reset(self, problem: Problem | dict) -> list[Message]:
        self.problem = Problem.from_dict(problem) if isinstance(problem, dict) else problem
        return [{"role": "user", "content": self.problem.prompt}]

    def reference_turns(self, problem: Problem) -> list[str]:
        return [self.task.solution_text(problem)]

    def step(self, model_turn: str, num_tokens: int | None = None) -> StepOut:
        if self.problem is None:
            raise RuntimeError("step() before reset()")
        r = self.task.reward(self.problem, model_turn)
        info = {"turns": 1, "tool_calls": 0, "malformed_calls": 0, "tool_errors": 0, "tool_seconds": 0.0,
                "truncated": False, "masked": False, "correct": r.correct, "details": r.details}
        return [], r.score, True, info


class ToolEnv(Environment):
    """A multi-turn environment with tools. Subclasses give the tools, the first messages and the
    scoring of the final answer (score_answer may raise Infra)."""

    preamble = ""

    def __init__(self, config, count_tokens: Callable[[str], int]):
        super().__init__(config, count_tokens)
        self.toolbox = Toolbox(self.tool_functions())
        self.info: dict[str, Any] = {}
        self.done = True

    def tool_functions(self) -> list[Callable[..., Any]]:
        raise NotImplementedError

    def score_answer(self, problem: Problem, answer: str) -> Reward:
        raise NotImplementedError

    def tool_schemas(self) -> list[dict]:
        return self.toolbox.schemas()

    def prompt(self, problem: Problem) -> str:
        return problem.prompt

    def reset(self, problem: Problem | dict) -> list[Message]:
        self.problem = Problem.from_dict(problem) if isinstance(problem, dict) else problem
        self.done = False
        self.tokens = 0
        self.info = {"turns": 0, "tool_calls": 0, "malformed_calls": 0, "tool_errors": 0, "tool_seconds": 0.0,
                     "truncated": False, "masked": False}
        return [{"role": "system", "content": self.toolbox.system_prompt(self.preamble)},
                {"role": "user", "content": self.prompt(self.problem)}]

    def _finish(self, reward: Reward | None, masked: bool = False, why: str = "") -> StepOut:
        self.done = True
        if reward is None:
            reward = Reward(0.0, {"correct": False, "reason": why})
        # a tool the infrastructure failed shaped the episode as much as a failed verifier would
        masked = masked or self.info.get("tool_infra_errors", 0) > 0
        self.info.update(correct=reward.correct, details=reward.details, masked=masked)
        return [], reward.score, True, dict(self.info)

    def step(self, model_turn: str, num_tokens: int | None = None) -> StepOut:
        if self.problem is None or self.done:
            raise RuntimeError("step() needs reset() first (and the episode is over)")
        self.info["turns"] += 1
        self.tokens += int(num_tokens) if num_tokens is not None else self.count_tokens(model_turn)
        parsed = parse_tool_calls(model_turn)
        if not parsed.has_calls:
            try:
                return self._finish(self.score_answer(self.problem, parsed.text))
            except Infra as e:
                return self._finish(None, masked=True, why=f"infra: {e}")
        if self.info["turns"] >= self.limits.max_turns:
            return self._finish(None, why="max_turns")
        replies = self._answer_calls(parsed)
        self.tokens += sum(self.count_tokens(m["content"]) for m in replies)
        if self.tokens > self.limits.max_total_tokens:
            self.info["truncated"] = True
            return self._finish(None, why="max_total_tokens")
        return replies, 0.0, False, dict(self.info)

    def _answer_calls(self, parsed: ParsedTurn) -> list[Message]:
        replies = []
        for err in parsed.errors:
            self.info["malformed_calls"] += 1
            replies.append({"role": "tool", "content": f"Error: {err.message}"})
        for call in parsed.calls:
            self.info["tool_calls"] += 1
            if self.info["tool_seconds"] >= self.limits.max_tool_seconds:
                self.info["tool_errors"] += 1
                replies.append({"role": "tool", "content": "Error: the tool time budget of this episode is used up"})
                continue
            t0 = time.monotonic()
            try:
                content = str(self.toolbox.call(call))
            except ToolError as e:
                self.info["tool_errors"] += 1
                content = f"Error: {e}"
            except Infra as e:
                self.info["tool_errors"] += 1
                self.info["tool_infra_errors"] = self.info.get("tool_infra_errors", 0) + 1
                content = f"Error: the tool is unavailable ({e})"
            except Exception as e:  # noqa: BLE001 - a tool's own failure is an answer, not a crash
                self.info["tool_errors"] += 1
                content = f"Error: {type(e).__name__}: {e}"[:1000]
            self.info["tool_seconds"] += time.monotonic() - t0
            replies.append({"role": "tool", "content": content})
        return replies
