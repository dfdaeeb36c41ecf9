"""The tool-use demo's pipeline on a tiny model: configs/tool_arith_smollm2.py:smoke with SmolLM2's
tokenizer and chat template but a tiny randomly initialized model; the traces CLI runs the
tool in the sandbox and writes the episodes, the trainer's SFT warm start trains on them with
loss on the model's tokens only, and the SFT'd model's held-out episodes run on the rollout path
with the demo's sizes."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from inference_worker.engine import Engine, SamplingParams
from inference_worker.rollout import EpisodeGroup, Rollouts
from rlax_tpu import sharding
from rlax_tpu import tokenizer as tokenizer_lib
from rlax_tpu.config import load_config
from rlax_tpu.envs import traces
from rlax_tpu.tasks import get_task
from tests.helpers.checkpoints import smollm2_or_skip
from tests.rlax_tpu.sandbox.usable import needs_bwrap
from trainer import bootstrap
from trainer.optim import make_optimizer

SPEC = "configs/tool_arith_smollm2.py:smoke"


def tiny_overrides(gguf: str, traces_path: str) -> list[str]:
    """The demo config with SmolLM2's tokenizer (from the GGUF) on a tiny model of its vocabulary."""
    return [f"--config.tokenizer.path={gguf}", "--config.model.hf_path=", "--config.model.arch=llama",
            "--config.model.vocab_size=49152", "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
            "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
            "--config.model.max_position_embeddings=512", "--config.mesh.fsdp=1",
            f"--config.sft.traces_path={traces_path}"]


class Recorder:
    def __init__(self):
        self.rows: list[tuple[int, dict, float]] = []

    def write(self, step, record, tokens=0.0):
        self.rows.append((step, record, tokens))


@needs_bwrap
def test_traces_cli_then_sft_warm_start_on_tool_arith_episodes(tmp_path, capsys):
    path = str(tmp_path / "traces.jsonl")
    overrides = tiny_overrides(smollm2_or_skip(), path)
    assert traces.main([f"--config={SPEC}", *overrides]) == 0
    config = load_config(SPEC, overrides)
    n = config.sft.steps * config.sft.batch_size
    assert f'"traces": {n}' in capsys.readouterr().out

    tok = tokenizer_lib.build(config, str(tmp_path / "tok"))
    rows = bootstrap.sft_episodes(config, tok, n)
    model_tokens = [sum(mask) for _, mask in rows]
    assert all(len(t) <= config.sft.max_len for t, _ in rows)  # nothing cut: the demo's max_len fits
    assert all(0 < m < len(t) // 2 for (t, _), m in zip(rows, model_tokens, strict=True))  # prompt + tools: 0

    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    model_cfg = bootstrap.model_config(config, tok)
    optimizer, _ = make_optimizer(config.trainer, total_steps=config.trainer.steps)
    state, layout = bootstrap.initial_state(config, model_cfg, mesh, optimizer)
    before = np.asarray(jax.tree.leaves(state["params"]["model"])[0]).copy()
    metrics = Recorder()
    state = bootstrap.run_sft(config, model_cfg, state, layout, mesh, get_task(config.task), tok, metrics,
                              lambda: False)
    assert [s for s, _, _ in metrics.rows] == list(range(1, config.sft.steps + 1))
    # Each step trains on exactly its traces' model tokens (the shuffle picks which traces).
    assert sum(tokens for _, _, tokens in metrics.rows) == sum(model_tokens)
    assert all(np.isfinite(float(r["sft/nll"])) and float(r["sft/nll"]) > 0 for _, r, _ in metrics.rows)
    assert not np.array_equal(before, np.asarray(jax.tree.leaves(state["params"]["model"])[0]))

    # The SFT'd weights in the engine, one held-out problem's group on the rollout path.
    engine = Engine.from_config(config.inference, nnx.merge(layout.graphdef, state["params"]["model"]), model_cfg,
                                mesh)
    rollouts = Rollouts.from_config(config, engine, tok)
    try:
        # The rollouts' prompt of the first SFT problem is the SFT episode's first tokens.
        first = rollouts.problems("train", 1, config.seed + traces.SFT_SEED_OFFSET)[0]
        start = rollouts.prompt(first)
        assert rows[0][0][:len(start)] == start and not any(rows[0][1][:len(start)])
        problem = rollouts.problems("eval", 1, config.seed)[0]
        prompt = rollouts.prompt(problem)
        params = SamplingParams(temperature=1.0, max_new_tokens=8, n=config.rl.group_size, seed=0,
                                stop_token_ids=(tok.eos_id,))
        (group,) = rollouts.run([EpisodeGroup(problem.to_dict(), prompt, params)])
    finally:
        rollouts.close()
    assert len(group) == config.rl.group_size
    for r in group:
        assert {"turns", "tool_calls", "malformed_calls", "token_mismatches"} <= set(r.details)
        assert not r.masked and len(r.tokens) == len(r.loss_mask) == len(r.logprobs) and r.loss_mask[0] == 1
