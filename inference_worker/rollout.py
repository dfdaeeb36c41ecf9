"""The one rollout path of the worker and the evaluator: episodes in, scored rollouts out.

    runner = Rollouts.from_config(config, engine, tokenizer)
    groups = runner.run([EpisodeGroup(problem, prompt_tokens, sampling_params), ...])
    # groups[i]: sampling_params.n scored Rollouts (rollout.sample(weights_step) -> replay Sample)

Each episode lives in one engine sequence: the group's n episodes are one request (they share
the prompt's pages), submitted with ``retain``; when a turn finishes, the environment's step runs
in a thread pool (a future), so the engine keeps decoding the other sequences while tools and
verifiers run; the environment's reply is rendered once (envs.Episode) and ``extend``-ed onto
the retained sequence, so the next turn prefills only the new tokens; the sequence is released
when the episode ends. A one-step task (config.env.name '') is the same loop without retained
pages, its finished turns scored together (task.rewards: a math task's process pool).

Ends of an episode: the environment says done; a turn cut short (max_new_tokens, or the engine's
max_seq_len: finish reason 'length'); the episode's tokens past config.env.max_total_tokens or no
room left in the engine ('length'). An infrastructure failure (the environment's
info['masked'], an environment or engine exception) gives an all-zero loss mask,
reward_details['masked'] and the 'masked' counter: left out of training, never scored as a real 0.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from inference_worker.engine import Engine, SamplingParams
from inference_worker.engine.sampling import SamplingError
from inference_worker.engine.sequences import EngineError
from rlax_tpu import envs
from rlax_tpu import tasks as tasks_lib
from rlax_tpu.envs.episode import check_messages
from rlax_tpu.replay import Sample
from rlax_tpu.tasks.base import Problem, stable_hash

log = logging.getLogger(__name__)

CUT = ("length", "cache")  # a turn the engine cut before it ended
# Counters of an episode copied from the environment's info into reward_details.
INFO_COUNTERS = ("turns", "tool_calls", "malformed_calls", "tool_errors", "tool_seconds", "truncated")


@dataclasses.dataclass(frozen=True)
class EpisodeGroup:
    """``params.n`` episodes of one problem from the same prompt (a GRPO group)."""

    problem: dict
    prompt: list[int]
    params: SamplingParams


@dataclasses.dataclass
class Rollout:
    """One scored episode: tokens after the prompt with their behavior log-probs and loss mask."""

    tokens: np.ndarray
    logprobs: np.ndarray
    loss_mask: np.ndarray
    reward: float
    details: dict
    finish_reason: str

    @property
    def masked(self) -> bool:
        return bool(self.details.get("masked", False))

    def sample(self, weights_step: int) -> Sample:
        return Sample(tokens=self.tokens, logprobs=self.logprobs, weights_step=weights_step, reward=self.reward,
                      reward_details=self.details, finish_reason=self.finish_reason, loss_mask=self.loss_mask)


@dataclasses.dataclass
class _Live:
    """An episode in flight: its environment, tokens, the engine sequence it continues."""

    group: int
    index: int
    env: envs.Environment
    episode: envs.Episode
    params: SamplingParams
    key: tuple[int, int] = (-1, 0)  # (request id, sample) of its engine sequence
    retained: bool = False
    last_finish: str = ""
    turns: int = 0
    error: str = ""


def _seed(base: int, index: int, turn: int) -> int:
    """The sampling seed of an episode's later turn: distinct per episode and turn."""
    return stable_hash(f"{base}:{index}:{turn}") % (2**63)


class Rollouts:
    """Runs episode groups on an engine with the configured environment (config.env.name)."""

    def __init__(self, config, engine: Engine, tokenizer, task=None, pool=None,
                 make_env: Callable[[], envs.Environment] | None = None):
        """task: the one-step task (built from config.task when None); pool: the sandbox pool of
        tool environments (built from config.sandbox when None); make_env: a factory of fresh
        environments instead of config.env.name's (scripted environments)."""
        self.config, self.engine, self.tokenizer = config, engine, tokenizer
        self._make_env = make_env
        self.one_step = make_env is None and config.env.name == ""
        self.limits = envs.EnvLimits.from_config(config)
        self.task = (task or tasks_lib.get_task(config.task)) if self.one_step else None
        self._pool = pool
        self._free: list[envs.Environment] = []
        probe = self._env()
        self.renderer = envs.EnvTurnRenderer(tokenizer, tools=probe.tool_schemas() or None)
        self._free.append(probe)
        # Environment steps block on tools and verifiers: a thread each, off the decode loop.
        self._executor = concurrent.futures.ThreadPoolExecutor(max(1, engine.max_batch), thread_name_prefix="env")
        self.counters: Counter = Counter()

    @classmethod
    def from_config(cls, config, engine: Engine, tokenizer, task=None) -> Rollouts:
        return cls(config, engine, tokenizer, task)

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def _env(self) -> envs.Environment:
        if self._free:
            return self._free.pop()
        if self._make_env is not None:
            return self._make_env()
        if self.one_step:
            return envs.TaskEnv(self.config, self.task, self._count_tokens)
        env = envs.make_env(self.config, self._count_tokens, self._pool)
        self._pool = self._pool or getattr(env, "pool", None)  # one sandbox pool for every episode
        return env

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        env = self._env()
        try:
            return env.train_problems(n, seed) if split == "train" else env.eval_problems(n, seed)
        finally:
            self._free.append(env)

    def prompt(self, problem: Problem | dict) -> list[int]:
        """The prompt ids of a problem's episodes (what the controller puts in its task)."""
        env = self._env()
        try:
            return envs.episode_prompt(self.tokenizer, env.reset(problem), self.renderer.tools)
        finally:
            self._free.append(env)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------- the loop
    def run(self, groups: Sequence[EpisodeGroup]) -> list[list[Rollout]]:
        """Every group's episodes, in order; never raises for one episode's failure."""
        t0 = time.perf_counter()
        out: list[list[Rollout | None]] = [[None] * g.params.n for g in groups]
        live: dict[tuple[int, int], _Live] = {}
        futures: dict[concurrent.futures.Future, list[_Live]] = {}
        for gi, g in enumerate(groups):
            eps = []
            for i in range(g.params.n):
                env = self._env()
                messages = env.reset(g.problem)
                eps.append(_Live(gi, i, env, envs.Episode(self.renderer, g.prompt, messages), g.params))
            try:
                rid = self.engine.submit(g.prompt, g.params, retain=not self.one_step)
            except (EngineError, SamplingError) as e:
                for ep in eps:
                    ep.error = f"engine: {e}"
                    self._end(ep, out, 0.0, {}, "error")
                continue
            for i, ep in enumerate(eps):
                ep.key, ep.retained = (rid, i), not self.one_step
                live[ep.key] = ep
        while live or futures:
            if self.engine.busy:
                self.engine.step()
            turns = []
            for rid, completions in self.engine.take_finished():
                for s, c in enumerate(completions):
                    ep = live.pop((rid, s))
                    ep.retained = ep.retained and c.finish_reason != "error"
                    if c.finish_reason == "error":
                        ep.error = f"engine: {c.error}"
                        self._end(ep, out, 0.0, {}, "error")
                        continue
                    ep.episode.add_model_turn(c.tokens, c.logprobs)
                    ep.last_finish, ep.turns = c.finish_reason, ep.turns + 1
                    turns.append(ep)
            if turns and self.one_step:
                # One call for every finished answer: a math task checks them in its pool together.
                futures[self._executor.submit(self._score_batch, turns)] = turns
            else:
                for ep in turns:
                    futures[self._executor.submit(ep.env.step, ep.episode.last_turn_text,
                                                  ep.episode.last_turn_tokens)] = [ep]
            if live and not futures and not self.engine.busy:
                raise RuntimeError(f"{len(live)} episodes wait for an engine that has nothing to run")
            done = [f for f in futures if f.done()]
            if not done and futures and not self.engine.busy:
                done, _ = concurrent.futures.wait(list(futures), return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                eps = futures.pop(f)
                try:
                    results = f.result()
                except Exception as e:  # noqa: BLE001 - the environment failed: infrastructure
                    log.warning("environment step failed: %s: %s", type(e).__name__, e)
                    for ep in eps:
                        ep.error = f"env: {type(e).__name__}: {e}"[:500]
                        self._end(ep, out, 0.0, {}, "error")
                    continue
                for ep, result in zip(eps, results if self.one_step else [results], strict=True):
                    self._after_step(ep, result, live, out)
        self.counters["rollout_seconds"] += time.perf_counter() - t0
        return out  # type: ignore[return-value]

    def _score_batch(self, eps: list[_Live]) -> list:
        rewards = self.task.rewards([ep.env.problem for ep in eps], [ep.episode.last_turn_text for ep in eps])
        return [([], r.score, True, {"turns": 1, "masked": False, "correct": r.correct, "details": r.details})
                for r in rewards]

    def _after_step(self, ep: _Live, result, live: dict, out: list) -> None:
        new_messages, reward, done, info = result
        cut = ep.last_finish in CUT
        if done or cut:
            self._end(ep, out, float(reward), info, "length" if cut else ep.last_finish)
            return
        # Room for the reply and one more sampled token, in the episode's budget and the engine.
        max_len = min(self.limits.max_total_tokens, self.engine.max_seq_len - len(ep.episode.prompt)) - 1
        delta = ep.episode.add_env_turn(check_messages(new_messages), max_len=max_len)
        if delta is None:
            self._end(ep, out, 0.0, {**info, "truncated": True}, "length")
            return
        used = len(ep.episode.tokens)
        p = ep.params
        params = SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                max_new_tokens=max(1, min(p.max_new_tokens, self.limits.max_total_tokens - used)),
                                n=1, seed=_seed(p.seed, ep.index, ep.turns), stop_token_ids=p.stop_token_ids,
                                stop_sequences=p.stop_sequences)
        try:
            rid = self.engine.extend(ep.key[0], delta, params, sample=ep.key[1], retain=True)
        except EngineError as e:  # the pages cannot hold it: the episode is as long as it gets
            log.info("episode cut: %s", e)
            self._end(ep, out, 0.0, {**info, "truncated": True}, "length")
            return
        ep.key = (rid, 0)
        live[ep.key] = ep

    def _end(self, ep: _Live, out: list, reward: float, info: dict, finish: str) -> None:
        if ep.retained:
            self.engine.release(*ep.key)
            ep.retained = False
        e = ep.episode
        details = dict(info.get("details") or {})
        details.setdefault("correct", bool(info.get("correct", False)))
        details.update({k: info[k] for k in INFO_COUNTERS if k in info})
        details.setdefault("turns", ep.turns)
        details.update(e.counters())
        masked = bool(info.get("masked", False)) or bool(ep.error)
        if ep.error:
            details["infra_error"] = ep.error
        details["masked"] = masked
        mask = np.asarray(e.loss_mask, np.uint8)
        if masked:
            mask = np.zeros_like(mask)
            reward = 0.0
            self.counters["masked"] += 1
        self.counters["episodes"] += 1
        self.counters["token_mismatches"] += details["token_mismatches"]
        self.counters["turns"] += ep.turns
        out[ep.group][ep.index] = Rollout(np.asarray(e.tokens, np.int32), np.asarray(e.logprobs, np.float32),
                                          mask, float(reward), details, finish)
        self._free.append(ep.env)
