"""Trainer start-up: tokenizer, model, run metadata, train state, and resume or SFT warm start."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rlax_tpu import models, run_meta, sharding
from rlax_tpu import tokenizer as tokenizer_lib
from rlax_tpu.config import ConfigError
from rlax_tpu.models import ModelConfig
from trainer import batching
from trainer.learner import Learner, LearnerSpec, to_host
from trainer.optim import make_optimizer
from trainer.state import StateLayout, create_state, reset_optimizer

log = logging.getLogger(__name__)


class StoppedDuringSFT(Exception):
    """A stop was requested during the SFT warm start (nothing is checkpointed before it ends)."""


def build_tokenizer(config, workdir: str, task, kv):
    """Process 0 builds (or trains) the tokenizer and writes it to the store; the others read it
    after a barrier (no polling: every process reaches the barrier before any collective)."""
    if jax.process_index() == 0:
        tok = tokenizer_lib.build(config, run_meta.local_dir(workdir), corpus=task.corpus())
        run_meta.write_tokenizer(kv, tok)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("rlax_tpu.trainer:tokenizer")
    if jax.process_index() == 0:
        return tok
    cache = os.path.join(run_meta.local_dir(workdir), f"tokenizer_p{jax.process_index()}")
    tok = run_meta.read_tokenizer(kv, config, cache)
    if tok is None:
        raise run_meta.MetaError(f"process 0 wrote no tokenizer to {kv.url} (is store.url shared by all hosts?)")
    return tok


def model_config(config, tok) -> ModelConfig:
    """The architecture: the checkpoint's, or config.model's (a trained tokenizer fixes the vocab)."""
    if config.model.hf_path and not os.path.exists(config.model.hf_path):
        raise ConfigError("model.hf_path", f"{config.model.hf_path!r} does not exist")
    trained_vocab = tok.vocab_size if config.tokenizer.kind == "train" and not config.model.hf_path else None
    cfg = models.config_from_section(config.model, trained_vocab)
    if cfg.vocab_size < tok.vocab_size:
        raise ConfigError("model.vocab_size", f"={cfg.vocab_size} is smaller than the tokenizer's "
                                              f"vocabulary of {tok.vocab_size}")
    return cfg


def sft_section(config) -> ml_collections.ConfigDict:
    """The optimizer settings of the SFT warm start: the trainer's, with config.sft's rate/steps."""
    sec = ml_collections.ConfigDict(config.trainer.to_dict())
    sec.learning_rate = config.sft.learning_rate
    sec.warmup_steps = min(config.sft.warmup_steps, config.sft.steps)
    sec.steps = max(config.sft.steps, 1)
    sec.schedule = "cosine"
    return sec


def sft_pairs(task, tok, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for problem in task.train_problems(n, seed):
        prompt = tok.encode_prompt(problem.prompt)
        answer = tok.encode(task.solution_text(problem)) + [tok.eos_id]
        pairs.append((prompt, answer))
    return pairs


def sft_episodes(config, tok, n: int) -> list[tuple[list[int], list[int]]]:
    """(tokens, loss mask) of config.sft.traces_path's first n episodes, in the episode layout."""
    from rlax_tpu.envs import traces

    return [traces.sft_row(traces.episode_tokens(tok, t))
            for t in traces.read_traces(config.sft.traces_path, config.env.name, n)]


def sft_layout(config, model_cfg: ModelConfig, layout: StateLayout) -> StateLayout:
    """The layout SFT computes with: the run's, or (config.sft.dtype set) the same f32 params under
    another compute dtype. The model's graphdef carries its dtype (activations follow it), so the
    graphdef is rebuilt from the model config, not only the layout's cast."""
    if not config.sft.dtype:
        return layout
    cfg = model_cfg.replace(dtype=models.resolve_dtype(config.sft.dtype))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=models.init_rngs(0),
                                                                      lora=layout.lora)))
    return dataclasses.replace(layout, graphdef=graphdef, compute_dtype=cfg.jnp_dtype)


def run_sft(config, model_cfg: ModelConfig, state: dict, layout: StateLayout, mesh, task, tok, metrics,
            should_stop) -> dict:
    """SFT warm start on prompt -> worked-solution traces (prompt tokens carry no loss), or on an
    environment's solved episodes (config.sft.traces_path: loss on model tokens only)."""
    c = config.sft
    optimizer, schedule = make_optimizer(sft_section(config), total_steps=c.steps)
    spec = LearnerSpec(micro_batches=config.trainer.micro_batches, logprob_chunk=config.model.logprob_chunk,
                       remat=config.trainer.remat, compute_entropy=False, temperature=1.0,  # the data's NLL
                       ppo_epochs=1, mini_batches=1, pack_len=config.trainer.pack_len)
    layout = sft_layout(config, model_cfg, layout)
    learner = Learner(mesh, layout, optimizer, spec, loss=None)
    state = reset_optimizer(state, optimizer, layout)
    if c.traces_path:
        pairs, make_batch = sft_episodes(config, tok, c.steps * c.batch_size), batching.sft_episode_batch
    else:
        pairs, make_batch = sft_pairs(task, tok, c.steps * c.batch_size, config.seed + 17), batching.sft_batch
    rng = np.random.default_rng(config.seed)
    rng.shuffle(pairs)
    log.info("SFT: %d steps of %d traces%s", c.steps, c.batch_size, f" from {c.traces_path}" * bool(c.traces_path))
    for i in range(c.steps):
        if should_stop():
            raise StoppedDuringSFT(f"stopped after {i} of {c.steps} SFT steps (SFT is redone on resume)")
        chunk = pairs[i * c.batch_size:(i + 1) * c.batch_size]
        host = make_batch(chunk, c.max_len)
        state, m = learner.sft_step(state, learner.place(host))
        metrics.write(i + 1, {**to_host(m), "sft/lr": float(schedule(i))},
                      tokens=float(host["mask"].sum()))
    return state


def initial_state(config, model_cfg: ModelConfig, mesh, rl_optimizer) -> tuple[dict, StateLayout]:
    model = models.build(config.model, model_cfg, config.seed, mesh=mesh, rules=sharding.TRAIN_RULES)
    with_value = config.rl.advantage == "gae"
    return create_state(model, model_cfg, mesh, rl_optimizer, seed=config.seed, with_value_head=with_value,
                        lora_spec=models.LoraSpec.from_config(config.lora))


def zero_step(state: dict) -> dict:
    return {**state, "step": jax.device_put(jnp.zeros((), jnp.int32), state["step"].sharding)}


def describe(model_cfg: ModelConfig, state: dict) -> dict[str, Any]:
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    out = {"params": count(state["params"]["model"]), "vocab": model_cfg.vocab_size,
           "layers": model_cfg.num_layers, "hidden": model_cfg.hidden_size}
    if "base" in state:  # LoRA: "params" counts the adapters
        out["frozen_base_params"] = count(state["base"])
    return out
