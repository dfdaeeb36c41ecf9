"""What the inference worker and the evaluator build from a run's store: the run's model config
and tokenizer (written by the trainer), the weights' pull target in the inference layout, and the
engine over pulled weights."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
from flax import nnx

from inference_worker.engine import Engine
from param_server import ParamStore, VariableClient
from param_server.adapters import AdapterReader
from rlax_tpu import run_meta, sharding
from rlax_tpu.kvstore import KVStore
from rlax_tpu.models import LoraSpec, ModelConfig, Transformer, init_rngs

log = logging.getLogger(__name__)


def abstract_params(model_cfg: ModelConfig, mesh: jax.sharding.Mesh):
    """(graphdef, pull target): ShapeDtypeStructs in the inference layout, nothing allocated."""
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=init_rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, sharding.INFERENCE_RULES))
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nnx.to_pure_dict(state), shardings)
    return graphdef, target


def abstract_adapters(model_cfg: ModelConfig, spec: LoraSpec, mesh: jax.sharding.Mesh):
    """The pull target of a LoRA version's adapters (float32: merges compute in float32)."""
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=init_rngs(0), lora=spec))
    shardings = nnx.to_pure_dict(nnx.state(sharding.param_shardings(abstract, mesh, sharding.INFERENCE_RULES),
                                           nnx.LoRAParam))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, "float32", sharding=sh),
                        nnx.to_pure_dict(nnx.state(abstract, nnx.LoRAParam)), shardings)


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
    # LoRA runs: ``store`` is the adapter tree and versions become weights through this reader.
    adapters: AdapterReader | None = None

    def read(self, version: int, reader: str | None = None) -> tuple[Any, dict]:
        """The weights of ``version`` in the layout of ``target`` (merged for LoRA), its manifest."""
        if self.adapters is not None:
            return self.adapters.read(version, reader)
        return self.store.read(self.target, version, reader=reader)

    def client(self, reader: str) -> VariableClient:
        """A background client of the newest weights (merged adapter versions for LoRA)."""
        return VariableClient(self.store, self.target, reader=reader,
                              read=None if self.adapters is None else self.adapters.read)

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
    held_cfg = model_cfg.replace(param_dtype=config.store.publish_dtype)
    graphdef, target = abstract_params(held_cfg, mesh)
    spec = LoraSpec.from_config(config.lora)
    if spec is None:
        return RunView(kv, store, model_cfg, tok, mesh, graphdef, target)
    reader = AdapterReader(store, target, abstract_adapters(held_cfg, spec, mesh), spec,
                           name=os.path.basename(cache_dir.rstrip("/")) or "reader")
    return RunView(kv, reader.store, model_cfg, tok, mesh, graphdef, target, reader)
