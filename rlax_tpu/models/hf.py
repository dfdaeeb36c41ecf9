"""Hugging Face interop: load_hf / save_hf for Llama, Qwen2 and Qwen3 causal LMs.

config.json is accepted in the transformers 5 form (``rope_parameters``, ``dtype``) and the older
form of most published checkpoints (``rope_theta``, ``rope_scaling``, ``torch_dtype``). Weights
come from model.safetensors or from shards listed in model.safetensors.index.json, memory-mapped;
with a mesh each device reads only its own slice (jax.make_array_from_callback), so the whole
model never sits on one device.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlax_tpu.models import safetensors_io
from rlax_tpu.models.config import DTYPES, ModelConfig, section_numerics
from rlax_tpu.models.transformer import Transformer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
HF_CLASSES = {v: k for k, v in ARCHITECTURES.items()}
# Tensors some checkpoints carry that the model derives instead.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A Hugging Face checkpoint this loader cannot use; the message names the file/tensor/field."""


# -- config.json -----------------------------------------------------------------------------
def config_from_hf(js: dict, *, dtype: str | None = None, where: str = "config.json") -> ModelConfig:
    """ModelConfig from a parsed HF config.json (new or old style)."""

    def get(key, default=None, required=False):
        if key not in js or js[key] is None:
            if required:
                raise CheckpointError(f"{where}: missing field {key!r}")
            return default
        return js[key]

    archs = get("architectures", required=True)
    arch_name = archs[0] if isinstance(archs, list) and archs else archs
    if arch_name not in ARCHITECTURES:
        raise CheckpointError(f"{where}: architectures: unknown architecture {arch_name!r}; "
                              f"supported: {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[arch_name]
    if get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={js['hidden_act']!r} is not supported (only 'silu')")
    if get("mlp_bias", False):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    if get("use_sliding_window", False):
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported")
    if arch != "qwen2" and get("attention_bias", False):
        raise CheckpointError(f"{where}: attention_bias=true is not supported for {arch_name}")

    rope = dict(get("rope_parameters") or {})
    if not rope:  # older form
        rope = dict(get("rope_scaling") or {})
        rope.setdefault("rope_theta", get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_scaling = None
    if rope_type == "llama3":
        try:
            rope_scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")}
        except KeyError as e:
            raise CheckpointError(f"{where}: llama3 rope scaling is missing field {e.args[0]!r}") from None
    elif rope_type != "default":
        raise CheckpointError(f"{where}: rope_type={rope_type!r} is not supported ('default', 'llama3')")

    ckpt_dtype = get("dtype") or get("torch_dtype") or "float32"
    param_dtype = dtype or (ckpt_dtype if ckpt_dtype in DTYPES else "float32")
    if param_dtype not in DTYPES:
        raise CheckpointError(f"load_hf: dtype={param_dtype!r} must be one of {DTYPES}")
    hidden, heads = get("hidden_size", required=True), get("num_attention_heads", required=True)
    return ModelConfig(
        vocab_size=get("vocab_size", required=True), hidden_size=hidden,
        intermediate_size=get("intermediate_size", required=True),
        num_layers=get("num_hidden_layers", required=True), num_heads=heads,
        num_kv_heads=get("num_key_value_heads", heads), head_dim=get("head_dim") or hidden // heads,
        rope_theta=float(rope.get("rope_theta", 10000.0)), rope_scaling=rope_scaling,
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)), qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        max_position_embeddings=get("max_position_embeddings", 2048), arch=arch,
        param_dtype=param_dtype, dtype=param_dtype, **section_numerics())


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json readable by transformers 5 (rope_parameters) and older (rope_theta, ...)."""
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        rope.update(cfg.rope_scaling_dict, rope_type="llama3")
    js = {
        "architectures": [HF_CLASSES[cfg.arch]], "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope,
        "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype, "use_cache": True,
    }
    if cfg.arch == "qwen2":
        js["use_sliding_window"] = False
    else:
        js["attention_bias"] = False
    if cfg.arch == "qwen3":
        js["use_sliding_window"] = False
    return js


# -- tensor name mapping -----------------------------------------------------------------------
class _Entry:
    """One param: its HF name, HF shape, and the layout transforms both ways (numpy views)."""

    def __init__(self, name: str, hf_shape: tuple, to_ours: Callable, to_hf: Callable):
        self.name, self.hf_shape, self.to_ours, self.to_hf = name, tuple(hf_shape), to_ours, to_hf


def hf_mapping(cfg: ModelConfig) -> dict[tuple, _Entry]:
    """Our state path -> _Entry."""
    h, d, i, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    nq = cfg.num_heads
    ident = lambda a: a
    m: dict[tuple, _Entry] = {("embed",): _Entry("model.embed_tokens.weight", (v, h), ident, ident),
                              ("norm", "scale"): _Entry("model.norm.weight", (h,), ident, ident)}
    if not cfg.tie_embeddings:
        m[("lm_head",)] = _Entry("lm_head.weight", (v, h), ident, ident)
    for li in range(cfg.num_layers):
        p = f"model.layers.{li}."
        m[("layers", li, "input_norm", "scale")] = _Entry(p + "input_layernorm.weight", (h,), ident, ident)
        m[("layers", li, "post_norm", "scale")] = _Entry(p + "post_attention_layernorm.weight", (h,),
                                                         ident, ident)
        for proj, n in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
            m[("layers", li, "attn", f"{proj}_proj")] = _Entry(
                p + f"self_attn.{proj}_proj.weight", (n * d, h),
                lambda a, n=n: a.T.reshape(h, n, d), lambda a, n=n: a.reshape(h, n * d).T)
            if cfg.qkv_bias:
                m[("layers", li, "attn", f"{proj}_bias")] = _Entry(
                    p + f"self_attn.{proj}_proj.bias", (n * d,),
                    lambda a, n=n: a.reshape(n, d), lambda a, n=n: a.reshape(n * d))
        m[("layers", li, "attn", "o_proj")] = _Entry(
            p + "self_attn.o_proj.weight", (h, nq * d),
            lambda a: a.T.reshape(nq, d, h), lambda a: a.reshape(nq * d, h).T)
        if cfg.qk_norm:
            for nm in ("q_norm", "k_norm"):
                m[("layers", li, "attn", nm, "scale")] = _Entry(p + f"self_attn.{nm}.weight", (d,),
                                                               ident, ident)
        for nm, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            m[("layers", li, "mlp", nm)] = _Entry(p + f"mlp.{nm}.weight", shape, lambda a: a.T,
                                                  lambda a: a.T)
    return m


# -- loading ---------------------------------------------------------------------------------
def _open_checkpoint(path: str) -> dict[str, np.ndarray]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = sorted(set(weight_map.values()))
        for fn in files:
            if not os.path.exists(os.path.join(path, fn)):
                raise CheckpointError(f"{index}: shard file {fn!r} is missing")
        files = [os.path.join(path, fn) for fn in files]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for fn in files:
        for name, arr in safetensors_io.open_tensors(fn).items():
            if name in tensors:
                raise CheckpointError(f"{fn}: tensor {name!r} appears in two files")
            tensors[name] = arr
    return tensors


def _path_key(path) -> tuple:
    return tuple(int(p) if isinstance(p, int) else str(p) for p in path)


def read_config(path: str, *, dtype: str | None = None, overrides: dict | None = None) -> ModelConfig:
    """The ModelConfig of the checkpoint directory ``path`` (its config.json), with ``overrides``
    of fields that do not change the weights. ``load_hf`` builds its model from exactly this."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{cfg_path}: missing config.json")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f), dtype=dtype, where=cfg_path)
    return apply_overrides(cfg, overrides, "load_hf")


# ModelConfig fields a caller may set on top of a checkpoint's: none of them changes the weights.
OVERRIDABLE = ("dtype", "attention_impl", "logprob_chunk", "max_position_embeddings")


def apply_overrides(cfg: ModelConfig, overrides: dict | None, who: str) -> ModelConfig:
    """cfg with ``overrides`` applied; CheckpointError if one would contradict the weights."""
    if not overrides:
        return cfg
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise CheckpointError(f"{who}: overrides {bad} would contradict the checkpoint; "
                              f"allowed: {sorted(OVERRIDABLE)}")
    return cfg.replace(**overrides)


def load_hf(path: str, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
            rules=None, overrides: dict | None = None) -> tuple[Transformer, ModelConfig]:
    """Loads a HF Llama/Qwen2/Qwen3 checkpoint directory -> (model, model_cfg).

    dtype: param and compute dtype ('float32'/'bfloat16'); default: the checkpoint's dtype
    (float32 when it is neither). mesh/rules: place every param straight into its NamedSharding
    (rules default to sharding.TRAIN_RULES). overrides: ModelConfig fields that do not change
    the weights (dtype, attention_impl, logprob_chunk, max_position_embeddings).
    """
    cfg = read_config(path, dtype=dtype, overrides=overrides)
    tensors = _open_checkpoint(path)
    mapping = hf_mapping(cfg)
    wanted = {e.name for e in mapping.values()}
    tolerated = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(n for n in tensors if n not in wanted and n not in tolerated
                        and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]} for {cfg.arch} "
                              f"({len(unexpected)} in all)")
    missing = sorted(wanted - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]} ({len(missing)} in all)")
    for e in mapping.values():
        if tuple(tensors[e.name].shape) != e.hf_shape:
            raise CheckpointError(f"{path}: tensor {e.name!r} has shape {tuple(tensors[e.name].shape)}, "
                                  f"expected {e.hf_shape} from config.json")

    def host_array(key: tuple) -> np.ndarray:
        if key not in mapping:
            raise CheckpointError(f"internal: param {key} has no HF tensor mapping")
        return mapping[key].to_ours(tensors[mapping[key].name])

    return place_params(cfg, host_array, mesh=mesh, rules=rules), cfg


def place_params(cfg: ModelConfig, host_array: Callable[[tuple], np.ndarray], *,
                 mesh: jax.sharding.Mesh | None = None, rules=None) -> Transformer:
    """The Transformer of ``cfg`` with each param taken from ``host_array(key)`` (a numpy array
    in our layout; key is the param's state path, e.g. ("layers", 0, "attn", "q_proj")).

    Called once per param, in order, so a loader can produce each array on demand (memory-map
    or dequantize it) and drop it before the next. With a mesh each device copies only its own
    slice (rules default to sharding.TRAIN_RULES); params are cast to cfg.param_dtype.
    """
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    gdef, abs_state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        from rlax_tpu import sharding as sh

        shardings = sh.param_shardings(abs_state, mesh, sh.TRAIN_RULES if rules is None else rules)
        flat_shardings = dict((_path_key(p), v) for p, v in nnx.to_flat_state(shardings))
    pdt = cfg.jnp_param_dtype

    flat = []
    for p, var in nnx.to_flat_state(abs_state):
        key = _path_key(p)
        arr = host_array(key)
        assert arr.shape == var.shape, (key, arr.shape, var.shape)
        if shardings is None:
            value = jnp.asarray(np.asarray(arr, dtype=pdt))
        else:
            value = jax.make_array_from_callback(
                arr.shape, flat_shardings[key].get_value(),
                lambda idx, arr=arr: np.asarray(arr[idx], dtype=pdt))
        flat.append((p, var.replace(value)))
    return nnx.merge(gdef, nnx.from_flat_state(flat))


# -- saving ----------------------------------------------------------------------------------
def save_hf(model: Transformer, model_cfg: ModelConfig, path: str) -> None:
    """Writes model.safetensors + config.json that transformers' from_pretrained loads."""
    os.makedirs(path, exist_ok=True)
    mapping = hf_mapping(model_cfg)
    tensors = {}
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        e = mapping[_path_key(p)]
        tensors[e.name] = np.ascontiguousarray(e.to_hf(np.asarray(jax.device_get(var.get_value()))))
    safetensors_io.save(tensors, os.path.join(path, "model.safetensors"))
    tmp = os.path.join(path, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config_to_hf(model_cfg), f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, "config.json"))
