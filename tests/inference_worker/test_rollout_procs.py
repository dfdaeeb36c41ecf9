"""A worker killed with kill -9 in the middle of an episode loses nothing: its task is leased
again after the lease expires, its episodes are run again from the start by another worker,
and the group is admitted once."""

from __future__ import annotations

import json
import signal
import sys
import time

import numpy as np
import pytest

from rlax_tpu import store_layout as keys
from rlax_tpu.envs import episode_prompt
from rlax_tpu.kvstore import KVStore
from tests.helpers.chatml import chatml_tokenizer
from tests.helpers.episode_worker import episode_config
from tests.helpers.episodes import ScriptedEnv
from tests.rlax_tpu.replay.test_replay_procs import Proc
from trainer.replay_controller import ReplayController

pytestmark = pytest.mark.slow


def _worker(url, wid, tok_dir, *extra):
    return Proc([sys.executable, "-m", "tests.helpers.episode_worker", "--url", url, "--worker-id", wid,
                 "--tokenizer", tok_dir, *map(str, extra)])


def test_worker_killed_mid_episode_loses_nothing(tmp_path):
    tok_dir = str(tmp_path / "tok")
    tok = chatml_tokenizer(tok_dir)
    url = f"file://{tmp_path}/store/"
    kv = KVStore.open(url)
    env = ScriptedEnv(episode_config(tok.vocab_size))
    problem = env.train_problems(1, seed=7)[0]
    ctl = ReplayController(kv, max_in_flight=2, max_staleness=1)
    sampling = {"temperature": 1.0, "max_new_tokens": 8}
    task = ctl.issue(problem.prompt_id, episode_prompt(tok, env.reset(problem)),
                     {"problem": problem.to_dict(), "sampling": sampling}, 2, 0)
    procs = [_worker(url, "a", tok_dir, "--lease-seconds", 1.0, "--tool-seconds", 30)]
    try:
        a = procs[0]
        a.wait_for(lambda e: e["event"] == "env_step", timeout=120)  # a tool runs: mid-episode
        assert json.loads(kv.get(keys.LEASES + task.task_id))["worker"] == "a"
        a.p.send_signal(signal.SIGKILL)
        a.p.wait()
        assert kv.list(keys.ROLLOUTS) == []  # nothing half-written
        procs.append(_worker(url, "b", tok_dir, "--lease-seconds", 1.0))
        procs[1].wait_for(lambda e: e["event"] == "submitted" and e["won"], timeout=120)
        got = []
        deadline = time.time() + 60
        while not got and time.time() < deadline:
            got = ctl.poll(0).admitted
            time.sleep(0.02)
        (adm,) = got
        assert adm.task.task_id == task.task_id and adm.group.worker_id == "b"
        assert len(adm.group.samples) == 2
        for s in adm.group.samples:
            assert len(s.tokens) == len(s.loss_mask) == len(s.logprobs) and s.loss_mask[0] == 1
            assert s.reward_details["turns"] >= 1 and not s.reward_details["masked"]
        assert any(0 in s.loss_mask for s in adm.group.samples)  # multi-turn episodes
        assert np.isfinite([s.reward for s in adm.group.samples]).all()
        time.sleep(0.3)
        assert ctl.poll(0).admitted == [] and ctl.counters["admitted"] == 1
    finally:
        for p in procs:
            p.stop()
