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
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from rlax_tpu import models, run_meta, store_layout
from rlax_tpu.kvstore import KVStore
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
    ckpt = Checkpointer(workdir, keep=1, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else int(step)
        if step is None:
            raise ExportError(f"no committed checkpoint in {ckpt.directory}")
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: models.Transformer(model_cfg, rngs=models.init_rngs(0))))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                              nnx.to_pure_dict(abstract))
        params = ckpt.restore_params(step, target)
    finally:
        ckpt.close()
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x.astype(dtype), params))
    os.makedirs(out, exist_ok=True)
    models.save_hf(nnx.merge(graphdef, state), model_cfg.replace(param_dtype=dtype), out)
    files = {name: data for name, data in run_meta.stored_tokenizer_files(kv).items()}
    if "spm.model" in files:  # a trained sentencepiece model, under the name HF tokenizers use
        files["tokenizer.model"] = files.pop("spm.model")
    for name, data in files.items():
        path = os.path.join(out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return {"step": step, "out": out, "dtype": dtype, "files": sorted(os.listdir(out))}


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
