"""trainer.export of a LoRA run: the merged HF checkpoint and the PEFT adapter, both loaded by
transformers (+ peft), give our merged model's logits."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from param_server import ParamStore
from param_server.adapters import AdapterPublisher
from rlax_tpu import models, run_meta
from rlax_tpu.kvstore import KVStore
from rlax_tpu.models import LoraSpec, lora
from tests.helpers.hf_models import forward, hf_logits, left_padded_batch, make_hf_model
from trainer.checkpointing import Checkpointer
from trainer.export import export

SPEC = LoraSpec(4, 8.0, ("q", "k", "v", "o", "gate", "up", "down"), 0.0)


def test_lora_run_exports_merged_hf_and_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    import transformers

    hf = make_hf_model("llama_tied", seed=3)
    hf.save_pretrained(str(tmp_path / "hf"))
    model, cfg = models.load_hf(str(tmp_path / "hf"))
    base = nnx.to_pure_dict(nnx.state(model))
    start = models.init_adapters(cfg, SPEC, seed=1)
    leaves, treedef = jax.tree.flatten(start)
    adapters = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(jax.random.key(i), x.shape)
                                            for i, x in enumerate(leaves)])
    # What a LoRA run leaves: model config, base + adapter trees in its store, adapter checkpoints.
    workdir = str(tmp_path / "run")
    kv = KVStore.open("", workdir)
    run_meta.write_model_config(kv, cfg)
    root = ParamStore.open(kv, publish_dtype="float32")
    root.acquire_epoch()
    pub = AdapterPublisher(root)
    pub.publish_base(base)
    pub.store.publish(adapters, 7, meta=pub.meta(SPEC))
    with Checkpointer(workdir, keep=1, async_save=False) as ckpt:
        ckpt.save(7, {"params": {"model": adapters}})
    out = str(tmp_path / "out")
    res = export(workdir, out)
    assert res["lora"] and res["step"] == 7 and "adapter/adapter_model.safetensors" in res["files"]

    tokens, mask, pos = left_padded_batch([8, 5], 8, seed=6)
    valid = mask.astype(bool)
    ours = np.asarray(forward(nnx.merge(nnx.graphdef(model), lora.merge(base, adapters, SPEC.scale)), tokens, pos,
                              mask))
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(merged_hf, tokens, mask, pos)[valid], ours[valid], atol=1e-4, rtol=0)
    with_adapter = peft.PeftModel.from_pretrained(hf, os.path.join(out, "adapter")).eval()
    np.testing.assert_allclose(hf_logits(with_adapter, tokens, mask, pos)[valid], ours[valid], atol=1e-4, rtol=0)
