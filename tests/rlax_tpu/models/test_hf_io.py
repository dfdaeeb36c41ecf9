"""load_hf / save_hf: round trips through transformers, old-style configs, sharded checkpoints,
and bad checkpoints rejected with an error naming the problem."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from rlax_tpu import models
from rlax_tpu.models import CheckpointError, safetensors_io
from tests.helpers.hf_models import forward, hf_logits, left_padded_batch, make_hf_model

TOL = 1e-4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for kind in ("qwen2_tied", "qwen3_untied", "llama3_scaled"):
        hf = make_hf_model(kind, seed=11)
        path = str(tmp_path_factory.mktemp(kind))
        hf.save_pretrained(path)
        out[kind] = (hf, path)
    return out


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch([9, 4], 9, seed=4)


def _check_against(hf, model, batch):
    tokens, mask, pos = batch
    valid = mask.astype(bool)
    ours = np.asarray(forward(model, tokens, pos, mask))
    np.testing.assert_allclose(ours[valid], hf_logits(hf, tokens, mask, pos)[valid], atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["qwen2_tied", "qwen3_untied", "llama3_scaled"])
def test_save_hf_round_trip_loads_in_transformers(ckpts, batch, kind, tmp_path):
    import transformers

    model, cfg = models.load_hf(ckpts[kind][1])
    models.save_hf(model, cfg, str(tmp_path))
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(hf2).__name__ == type(ckpts[kind][0]).__name__
    _check_against(hf2, model, batch)
    model2, cfg2 = models.load_hf(str(tmp_path))  # and back into ours, config unchanged
    assert cfg2 == cfg


def test_old_style_config_json(ckpts, batch, tmp_path):
    hf, path = ckpts["llama3_scaled"]
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    with open(tmp_path / "config.json") as f:
        js = json.load(f)
    rope = js.pop("rope_parameters")
    js["rope_theta"] = rope.pop("rope_theta")
    js["rope_scaling"] = {**rope, "rope_type": "llama3"}
    js["torch_dtype"] = js.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(js))
    model, cfg = models.load_hf(str(tmp_path))
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling_dict["factor"] == 8.0
    _check_against(hf, model, batch)


def test_sharded_checkpoint_with_index(ckpts, batch, tmp_path):
    hf = ckpts["qwen3_untied"][0]
    hf.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model, _ = models.load_hf(str(tmp_path))
    _check_against(hf, model, batch)


# -- bad checkpoints -----------------------------------------------------------------------------
def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    f = os.path.join(dst, "model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors_io.open_tensors(f).items()}
    edit(tensors)
    safetensors_io.save(tensors, f)
    return str(dst)


def test_missing_tensor(ckpts, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = _broken_copy(ckpts["qwen2_tied"][1], tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor.*{name}"):
        models.load_hf(path)


def test_wrong_shape(ckpts, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    path = _broken_copy(ckpts["qwen2_tied"][1], tmp_path,
                        lambda t: t.__setitem__(name, np.zeros((3, 64), np.float32)))
    with pytest.raises(CheckpointError, match=f"{name}.*shape \\(3, 64\\)"):
        models.load_hf(path)


def test_unexpected_tensor(ckpts, tmp_path):
    name = "model.layers.0.self_attn.o_proj.bias"
    path = _broken_copy(ckpts["qwen2_tied"][1], tmp_path,
                        lambda t: t.__setitem__(name, np.zeros((64,), np.float32)))
    with pytest.raises(CheckpointError, match=f"unexpected tensor.*{name}"):
        models.load_hf(path)


def test_unknown_architecture_and_missing_config(ckpts, tmp_path):
    shutil.copytree(ckpts["qwen2_tied"][1], tmp_path, dirs_exist_ok=True)
    js = json.loads((tmp_path / "config.json").read_text())
    js["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(js))
    with pytest.raises(CheckpointError, match="unknown architecture 'GPT2LMHeadModel'"):
        models.load_hf(str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="missing config.json"):
        models.load_hf(str(tmp_path))


def test_unsupported_rope_type(ckpts, tmp_path):
    shutil.copytree(ckpts["qwen2_tied"][1], tmp_path, dirs_exist_ok=True)
    js = json.loads((tmp_path / "config.json").read_text())
    js["rope_parameters"] = {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(js))
    with pytest.raises(CheckpointError, match="rope_type='yarn'"):
        models.load_hf(str(tmp_path))


def test_build_from_config_section(ckpts):
    from rlax_tpu.config import get_base_config

    c = get_base_config().model
    c.hf_path = ckpts["qwen3_untied"][1]
    c.logprob_chunk = 40
    cfg = models.config_from_section(c)
    model = models.build(c, cfg, 0)
    assert cfg.arch == "qwen3" and cfg.logprob_chunk == 40 and cfg.head_dim == 32 and model.cfg == cfg
    with pytest.raises(CheckpointError, match="the checkpoint describes"):
        models.build(c, cfg.replace(rope_theta=1.0), 0)
    c.hf_path = ""
    c.arch, c.rope_scaling_factor = "llama", 8.0
    cfg = models.config_from_section(c)
    model = models.build(c, cfg, 0)
    assert cfg.rope_scaling_dict["factor"] == 8.0 and not cfg.qkv_bias
    assert model.embed[...].shape == (c.vocab_size, c.hidden_size)


def test_llama3_rope_scaling_round_trips_through_the_store_model_config(tmp_path):
    """The run's model config goes to the store as JSON and comes back in each worker: the
    Llama-3 rope scaling must come back equal to the trainer's copy and hashable (jit-static)."""
    from rlax_tpu import run_meta
    from rlax_tpu.kvstore import KVStore

    c = models.config_from_section(_llama3_section())
    assert c.rope_scaling is not None
    kv = KVStore.open(f"file://{tmp_path}/store/", str(tmp_path))
    run_meta.write_model_config(kv, c)
    back = run_meta.read_model_config(kv)
    assert back == c and hash(back) == hash(c) and back.rope_scaling_dict == c.rope_scaling_dict
    run_meta.write_model_config(kv, back)  # a resumed trainer's copy is the same model


def _llama3_section():
    from rlax_tpu.config import get_base_config

    c = get_base_config().model
    c.arch, c.rope_scaling_factor, c.rope_original_max_position_embeddings = "llama", 8.0, 16
    return c


def test_model_config_errors_name_the_field():
    from rlax_tpu.config import ConfigError
    from rlax_tpu.models import ModelConfig

    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=4,
                num_kv_heads=2, head_dim=2, rope_theta=1e4, rope_scaling=None, rms_norm_eps=1e-6, qkv_bias=False,
                qk_norm=False, tie_embeddings=True, max_position_embeddings=64, arch="llama",
                param_dtype="float32", dtype="float32", attention_impl="auto", logprob_chunk=8)
    ModelConfig(**base)
    with pytest.raises(ConfigError, match="config.model.num_kv_heads"):
        ModelConfig(**{**base, "num_kv_heads": 3})
    with pytest.raises(ConfigError, match="config.model.dtype"):
        ModelConfig(**{**base, "dtype": "float16"})
    with pytest.raises(ConfigError, match="config.model.rope_scaling.*missing"):
        ModelConfig(**{**base, "rope_scaling": {"factor": 8.0}})
    with pytest.raises(TypeError, match="logprob_chunk"):  # no shadow defaults: every field is given
        ModelConfig(**{k: v for k, v in base.items() if k != "logprob_chunk"})


def test_trainer_model_from_hf_honours_config_and_matches_published_config(tmp_path):
    """The trainer publishes bootstrap.model_config() to workers and trains models.build(): for a
    Hugging Face checkpoint both must apply config.model's dtype and attention settings."""
    from rlax_tpu import sharding
    from rlax_tpu.config import get_base_config
    from trainer import bootstrap

    make_hf_model("qwen2_tied").save_pretrained(tmp_path)
    config = get_base_config()
    config.model.hf_path = str(tmp_path)
    config.model.attention_impl = "reference"
    config.model.logprob_chunk = 32

    class Tok:  # the vocabulary check needs only the size
        vocab_size = 8

    published = bootstrap.model_config(config, Tok())
    mesh = jax.make_mesh((1, 1, 1), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:1])
    assert models.build(config.model, published, mesh=mesh).cfg == published
    assert (published.attention_impl, published.logprob_chunk) == ("reference", 32)
