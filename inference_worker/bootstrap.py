"""What the inference worker and the evaluator build from a run's store: the run's model config
and tokenizer (written by the trainer), the weights' pull target in the inference layout, and the
engine over pulled weights."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
from flax import nnx

from inference_worker.engine import Engine
from param_server import ParamStore
from rlax_tpu import run_meta, sharding
from rlax_tpu.kvstore import KVStore
from rlax_tpu.models import ModelConfig, Transformer, init_rngs

log = logging.getLogger(__name__)


def abstract_params(model_cfg: ModelConfig, mesh: jax.sharding.Mesh):
    """(graphdef, pull target): ShapeDtypeStructs in the inference layout, nothing allocated."""
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=init_rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, sharding.INFERENCE_RULES))
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nnx.to_pure_dict(state), shardings)
    return graphdef, target


@dataclasses.dataclass
class RunView:
    """A role's handle on a run: its store, model, tokenizer and the inference layout."""

    kv: KVStore
    store: ParamStore
    model_cfg: ModelConfig
    tokenizer: Any
    mesh: jax.sharding.Mesh
    graphdef: Any
    target: Any

    def engine(self, config, params) -> Engine:
        """The engine over pulled weights (a pure dict in the layout of ``target``)."""
        return Engine.from_config(config.inference, nnx.merge(self.graphdef, params), self.model_cfg, self.mesh)


def open_run(config, workdir: str, cache_dir: str, *, wait_s: float) -> RunView:
    """Opens the run's store and waits (up to ``wait_s``) for the trainer's run metadata."""
    kv = KVStore.open(config.store.url, workdir)
    store = ParamStore.open(kv, config=config)
    model_cfg, tok = run_meta.wait_for_meta(kv, config, cache_dir, timeout_s=wait_s,
                                            poll_s=config.replay.poll_seconds, log=log.info)
    mesh = sharding.make_mesh(config.inference.mesh)
    # Weights are held as published (the trainer's model config has its float32 masters).
    graphdef, target = abstract_params(model_cfg.replace(param_dtype=config.store.publish_dtype), mesh)
    return RunView(kv, store, model_cfg, tok, mesh, graphdef, target)
