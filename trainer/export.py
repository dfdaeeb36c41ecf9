"""Export a trained policy as a Hugging Face checkpoint directory other tools load.

    python -m trainer.export --workdir=DIR [--step=S] --out=OUT [--dtype=bfloat16] [--config=configs/X.py[:arg]]

Reads the run's orbax checkpoint at step S (default: the newest committed one; only the policy's
float32 master weights, never the optimizer state), writes them in ``--dtype`` (float32 by
default, or bfloat16; config.json says which), and the model config and tokenizer files the trainer wrote
to the run's store, and writes OUT/model.safetensors, OUT/config.json and the tokenizer's files
(tokenizer.json and tokenizer_config.json with the chat template, for Hugging Face and GGUF
tokenizers; the sentencepiece model for a trained one), so that transformers'
``AutoModelForCausalLM.from_pretrained(OUT)`` (and ``AutoTokenizer``) load it. ``--config`` is
needed only when the run's store is not ``<workdir>/store`` (e.g. a gs:// store.url).

A LoRA run (its store has an ``adapter`` tree): the checkpoint holds the adapters, the store's
``base`` tree the frozen base they name; OUT gets the merged model (W0 + alpha/r A @ B) and
OUT/adapter the adapters in PEFT's format (adapter_config.json + adapter_model.safetensors:
``peft.PeftModel.from_pretrained(base_model, OUT/adapter)``). The merged weights are the base as
published (config.store.publish_dtype) plus the float32 adapters.
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from param_server import ParamStore
from param_server.adapters import ADAPTER_TREE, AdapterReader
from rlax_tpu import models, run_meta, store_layout
from rlax_tpu.kvstore import KVStore
from rlax_tpu.models import lora
from rlax_tpu.models.config import DTYPES
from trainer.checkpointing import Checkpointer


class ExportError(RuntimeError):
    """Nothing to export (no checkpoint, no run metadata); the message says where it looked."""


def export(workdir: str, out: str, step: int | None = None, store_url: str = "", dtype: str = "float32") -> dict:
    """Writes the HF directory with the weights in ``dtype``; returns {"step", "out", "dtype", "files"}."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype={dtype!r}: expected one of {DTYPES}")
    kv = KVStore.open(store_url, workdir)
    model_cfg = run_meta.read_model_config(kv)
    if model_cfg is None:
        raise ExportError(f"no model config in {kv.url}{store_layout.MODEL_KEY}: is {workdir!r} a run's workdir "
                          "(or pass --config with its store.url)?")
    spec = _lora_spec(kv)
    ckpt = Checkpointer(workdir, keep=1, async_save=False)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    on_host = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), tree)  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: models.Transformer(model_cfg, rngs=models.init_rngs(0))))
    try:
        step = ckpt.latest_step() if step is None else int(step)
        if step is None:
            raise ExportError(f"no committed checkpoint in {ckpt.directory}")
        if spec is None:
            params = ckpt.restore_params(step, on_host(nnx.to_pure_dict(abstract)))
        else:
            adapted = nnx.eval_shape(lambda: models.Transformer(model_cfg, rngs=models.init_rngs(0), lora=spec))
            adapters = ckpt.restore_params(step, on_host(nnx.to_pure_dict(nnx.state(adapted, nnx.LoRAParam))))
    finally:
        ckpt.close()
    os.makedirs(out, exist_ok=True)
    extra = []
    if spec is not None:
        params = _merged(kv, on_host(nnx.to_pure_dict(abstract)), adapters, spec)
        extra = [os.path.join("adapter", f) for f in lora.save_peft(adapters, spec, model_cfg,
                                                                     os.path.join(out, "adapter"))]
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x.astype(dtype), params))
    models.save_hf(nnx.merge(graphdef, state), model_cfg.replace(param_dtype=dtype), out)
    files = {name: data for name, data in run_meta.stored_tokenizer_files(kv).items()}
    if "spm.model" in files:  # a trained sentencepiece model, under the name HF tokenizers use
        files["tokenizer.model"] = files.pop("spm.model")
    for name, data in files.items():
        path = os.path.join(out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    files = sorted(f for f in os.listdir(out) if f != "adapter") + extra
    return {"step": step, "out": out, "dtype": dtype, "files": files, "lora": spec is not None}


def _lora_spec(kv: KVStore) -> lora.LoraSpec | None:
    """The LoRA settings of the run's newest adapter version, or None for a full fine-tuning run."""
    store = ParamStore.open(kv, tree=ADAPTER_TREE)
    latest = store.latest_version()
    if latest is None:
        return None
    m = store.read_manifest(latest)["meta"]["lora"]
    # Dropout is a training-time setting the manifest does not carry: an export is for inference.
    return lora.LoraSpec(int(m["rank"]), float(m["alpha"]), tuple(m["targets"]), dropout=0.0)


def _merged(kv: KVStore, base_target, adapters, spec: lora.LoraSpec):
    """The checkpoint's adapters merged into the base their newest published version names."""
    reader = AdapterReader(ParamStore.open(kv), base_target, None, spec, name="export")
    latest = reader.store.latest_version()
    reader.load_base(reader.store.read_manifest(latest)["meta"]["base_hash"], latest)
    return reader.merge(adapters)


def main(argv) -> None:
    del argv
    from absl import app

    from rlax_tpu import logs

    logs.setup()
    if not _WORKDIR.value or not _OUT.value:
        raise app.UsageError("--workdir and --out are required")
    url = _CONFIG.value.store.url if _CONFIG.value is not None else ""
    try:
        print(json.dumps(export(_WORKDIR.value, _OUT.value, _STEP.value, url, _DTYPE.value), indent=2))
    except (ExportError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config (only for its store.url).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (checkpoints under it).")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    _OUT = flags.DEFINE_string("out", None, "Output directory (created).")
    _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                               "dtype of the written weights (the checkpoint holds float32 masters).")
    app.run(main)
