"""The real pretrained model end to end: 2 RL steps of configs/gsm8k.py on SmolLM2-135M-Instruct
through the real roles (launcher, janitor, trainer, a worker: GGUF weights, GGUF tokenizer and
chat template, math-verify rewards), then trainer.export, loaded back by transformers with the
same logits and the same tokenizer and chat template."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT
from tests.helpers.checkpoints import smollm2_or_skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_or_skip()


@pytest.mark.timeout(900)
def test_gsm8k_two_rl_steps_on_smollm2_then_export_loads_in_transformers(smollm2, tmp_path):
    wd, out = tmp_path / "run", tmp_path / "export"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "rlax_tpu.launch", "--config=configs/gsm8k.py:ci", f"--workdir={wd}",
           "--config.eval.num_samples=0", "--config.launch.status_every_s=60"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if "replay/task_ids" in r]
    assert [r["step"] for r in rl] == [1, 2]
    for r in rl:  # real rollouts scored by math-verify, and the engine matching the trainer
        assert np.isfinite(r["loss"]) and r["completion/len_mean"] > 0
        assert "reward/mean" in r
    assert rl[0]["mismatch/max_abs_ratio_minus_1"] < 1e-3  # f32 weights published: same policy

    res = subprocess.run([sys.executable, "-m", "trainer.export", f"--workdir={wd}", f"--out={out}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["step"] == 2
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))

    import torch
    import transformers

    from rlax_tpu import models
    from rlax_tpu import tokenizer as tokenizer_lib
    from rlax_tpu.config import load_config

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    config = load_config("configs/gsm8k.py:ci")
    ours_tok = tokenizer_lib.build(config, str(wd))  # the run's GGUF-converted tokenizer
    messages = [{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. Total?"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)  # a BatchEncoding in transformers 5
    assert ids == ours_tok.encode_chat(messages, add_generation_prompt=True)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    model, cfg = models.load(str(out))
    got = np.asarray(model(np.asarray([ids], np.int32)))[0]
    assert cfg.vocab_size == 49152 and cfg.num_layers == 30
    assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()
    # The exported weights are the checkpoint's, bit for bit.
    import jax
    from flax import nnx

    from trainer.checkpointing import Checkpointer

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          nnx.to_pure_dict(nnx.state(model)))
    with Checkpointer(str(wd), keep=1, async_save=False) as ckpt:
        saved = ckpt.restore_params(2, target)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
