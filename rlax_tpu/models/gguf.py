"""GGUF (llama.cpp) checkpoints: load_gguf / read_gguf_config for Llama, Qwen2 and Qwen3.

The architecture comes from the file's metadata (``{arch}.block_count``, ...). Weights are
dequantized to f32 by the gguf package one tensor at a time, as each param is placed (so host
memory holds about one dequantized tensor beyond the memory-mapped file), then mapped through
the same layout table as load_hf. llama.cpp's converter reorders the rows of Llama's q/k
projections for its interleaved RoPE; that is undone here (Qwen2/Qwen3 are stored unpermuted).
Llama 3 rope scaling, which llama.cpp stores as a ``rope_freqs.weight`` tensor of per-frequency
divisors, is recovered as the equivalent ModelConfig.rope_scaling.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.models.config import DTYPES, ModelConfig, section_numerics
from rlax_tpu.models.hf import CheckpointError, apply_overrides, hf_mapping, place_params
from rlax_tpu.models.layers import rope_inv_freq
from rlax_tpu.models.transformer import Transformer

ARCHS = ("llama", "qwen2", "qwen3")
# Tensor types loaded (each covered by a test); others, e.g. the IQ* codebook quants, are refused.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Archs whose q/k rows llama.cpp permutes (as transformers' GGUF loader undoes for 'llama' only).
_PERMUTED_ARCHS = ("llama",)
_ROPE_FREQS = "rope_freqs.weight"

# The one name table: HF tensor name -> llama.cpp tensor name (per layer: after
# "model.layers.{i}." and "blk.{i}.").
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_REQUIRED = object()


def gguf_name(hf_name: str) -> str:
    """The llama.cpp name of the HF tensor ``hf_name``."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m is None or m[2] not in _LAYER_NAMES:
        raise CheckpointError(f"internal: HF tensor {hf_name!r} has no GGUF name")
    return f"blk.{m[1]}.{_LAYER_NAMES[m[2]]}"


def _open(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _hf_shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first


# -- metadata ----------------------------------------------------------------------------------
def _config(reader, where: str, dtype: str | None) -> ModelConfig:
    def get(key: str, default=_REQUIRED):
        field = reader.get_field(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{where}: missing metadata key {key!r}")
            return default
        return field.contents()

    arch = get("general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{where}: general.architecture={arch!r} is not supported; supported: {list(ARCHS)}")

    def num(suffix: str, kind=int, default=_REQUIRED):
        key = f"{arch}.{suffix}"
        value = get(key, default)
        if isinstance(value, list):  # per-layer values (hybrid models) do not fit this transformer
            raise CheckpointError(f"{where}: metadata key {key!r} is a per-layer list; one value is supported")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{where}: metadata key {key!r}={value!r} is not a number")
        return kind(value)

    hidden, heads = num("embedding_length"), num("attention.head_count")
    if hidden <= 0 or heads <= 0:
        raise CheckpointError(f"{where}: embedding_length={hidden} and attention.head_count={heads} must be > 0")
    head_dim = num("attention.key_length", default=hidden // heads)
    for suffix in ("attention.value_length", "rope.dimension_count"):
        other = num(suffix, default=head_dim)
        if other != head_dim:
            raise CheckpointError(f"{where}: {arch}.{suffix}={other} differs from the head dimension {head_dim}; "
                                  "only full-width rotary heads with equal k/v sizes are supported")
    scaling = get(f"{arch}.rope.scaling.type", "none")
    factor = num("rope.scale_linear" if scaling == "none" else "rope.scaling.factor", float, 1.0)
    if scaling not in ("none", "linear") or factor != 1.0:  # linear by 1 is plain RoPE
        raise CheckpointError(f"{where}: rope scaling {scaling!r} by {factor} ({arch}.rope.scaling.*) is not "
                              "supported; only Llama 3 scaling (a rope_freqs.weight tensor) is")

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{where}: missing tensor 'token_embd.weight'")
    vocab = _hf_shape(tensors["token_embd.weight"])[0]
    if num("vocab_size", default=vocab) != vocab:
        raise CheckpointError(f"{where}: {arch}.vocab_size={num('vocab_size')} but token_embd.weight has "
                              f"{vocab} rows")
    param_dtype = dtype or "float32"  # dequantized weights are f32
    if param_dtype not in DTYPES:
        raise CheckpointError(f"load_gguf: dtype={param_dtype!r} must be one of {DTYPES}")
    fields = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=num("feed_forward_length"),
        num_layers=num("block_count"), num_heads=heads, num_kv_heads=num("attention.head_count_kv", default=heads),
        head_dim=head_dim, rope_theta=num("rope.freq_base", float, 10000.0),
        rms_norm_eps=num("attention.layer_norm_rms_epsilon", float), qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3", tie_embeddings="output.weight" not in tensors,
        max_position_embeddings=num("context_length"), arch=arch, param_dtype=param_dtype, dtype=param_dtype,
        rope_scaling=None, **section_numerics())
    try:
        cfg = ModelConfig(**fields)
    except ConfigError as e:  # e.g. head counts that do not divide: name the file, not config.model
        raise CheckpointError(f"{where}: the metadata gives an invalid model: {e}") from None
    if _ROPE_FREQS in tensors:
        if arch != "llama":
            raise CheckpointError(f"{where}: tensor {_ROPE_FREQS!r} (Llama 3 rope scaling) in a {arch} model")
        cfg = cfg.replace(rope_scaling=_llama3_scaling(_dequantize(tensors[_ROPE_FREQS], where), cfg, where))
    return cfg


def _llama3_scaling(divisors: np.ndarray, cfg: ModelConfig, where: str) -> dict | None:
    """Llama 3 rope scaling from llama.cpp's per-frequency divisors.

    A divisor is 1 for high frequencies, ``factor`` for low ones, and 1 / ((1 - s) / factor + s)
    between, where s is linear in 1 / wavelength: 0 at low_freq_factor / original_len, 1 at
    high_freq_factor / original_len. Only those two ratios matter, so two blended frequencies
    determine them; original_len is chosen to make low_freq_factor 1, as in the published
    Llama 3.x configs. The result is checked by regenerating the divisors.
    """
    inv = rope_inv_freq(cfg.replace(rope_scaling=None)).astype(np.float64)
    div = np.asarray(divisors, np.float64).reshape(-1)
    if div.shape != inv.shape:
        raise CheckpointError(f"{where}: {_ROPE_FREQS!r} has {div.size} values, expected head_dim / 2 = {inv.size}")
    if np.allclose(div, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(div.max())
    blended = (div > 1 + 1e-4) & (div < factor * (1 - 1e-4))
    fail = f"{where}: {_ROPE_FREQS!r} is not Llama 3 rope scaling"
    if blended.sum() < 2:
        raise CheckpointError(f"{fail} with two or more blended frequencies (got {int(blended.sum())})")
    s = (1 / div[blended] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv[blended] / (2 * math.pi), s, 1)
    if not (slope > 0 and intercept < 0):
        raise CheckpointError(f"{fail} (blend not increasing with frequency)")
    original_len = round(-slope / intercept)
    scaling = {"factor": factor, "low_freq_factor": -intercept / slope * original_len,
               "high_freq_factor": (1 - intercept) / slope * original_len,
               "original_max_position_embeddings": original_len}
    got = rope_inv_freq(cfg.replace(rope_scaling=scaling))
    if not np.allclose(got, inv / div, rtol=1e-4, atol=0):
        raise CheckpointError(f"{fail} (no factor/low/high/original length reproduces it)")
    return scaling


def read_gguf_config(path: str, *, dtype: str | None = None, overrides: dict | None = None) -> ModelConfig:
    """The ModelConfig of the GGUF file ``path`` (from its metadata; of the weights only the small
    rope_freqs tensor is read), with ``overrides`` of fields that do not change the weights.
    ``load_gguf`` builds exactly this."""
    return apply_overrides(_config(_open(path), path, dtype), overrides, "load_gguf")


# -- weights -----------------------------------------------------------------------------------
def _type_name(tensor) -> str:
    return getattr(tensor.tensor_type, "name", str(tensor.tensor_type))


def _check_type(tensor, where: str) -> None:
    if _type_name(tensor) not in SUPPORTED_TYPES:
        raise CheckpointError(f"{where}: tensor {tensor.name!r} has type {_type_name(tensor)}, which is not "
                              f"supported; supported: {list(SUPPORTED_TYPES)}")


def _dequantize(tensor, where: str) -> np.ndarray:
    """f32 values in HF dimension order (outermost first)."""
    import gguf

    _check_type(tensor, where)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(_hf_shape(tensor))


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: per head, rows (pairs interleaved) -> halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
              rules=None, overrides: dict | None = None) -> tuple[Transformer, ModelConfig]:
    """Loads a llama.cpp GGUF file (Llama/Qwen2/Qwen3; see SUPPORTED_TYPES) -> (model, model_cfg).

    dtype: param and compute dtype ('float32'/'bfloat16'); default float32. mesh/rules: place
    every param straight into its NamedSharding (rules default to sharding.TRAIN_RULES).
    overrides: ModelConfig fields that do not change the weights, as for load_hf.
    """
    reader = _open(path)
    cfg = apply_overrides(_config(reader, path, dtype), overrides, "load_gguf")
    tensors = {t.name: t for t in reader.tensors}
    mapping = hf_mapping(cfg)
    names = {key: gguf_name(e.name) for key, e in mapping.items()}
    unexpected = sorted(set(tensors) - set(names.values()) - {_ROPE_FREQS})
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]} for {cfg.arch} "
                              f"({len(unexpected)} in all)")
    missing = sorted(set(names.values()) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]} ({len(missing)} in all)")
    for key, name in names.items():  # shapes and types first: fail before dequantizing anything
        t = tensors[name]
        if _hf_shape(t) != mapping[key].hf_shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {_hf_shape(t)} (outermost first), expected "
                                  f"{mapping[key].hf_shape} from the metadata")
        _check_type(t, path)
    permuted = {"attn_q.weight": cfg.num_heads, "attn_k.weight": cfg.num_kv_heads}

    def host_array(key: tuple) -> np.ndarray:
        if key not in mapping:
            raise CheckpointError(f"internal: param {key} has no GGUF tensor mapping")
        name = names[key]
        w = _dequantize(tensors[name], path)
        suffix = name.split(".", 2)[-1]  # "blk.3.attn_q.weight" -> "attn_q.weight"
        if cfg.arch in _PERMUTED_ARCHS and suffix in permuted:
            w = _unpermute(w, permuted[suffix])
        return mapping[key].to_ours(w)

    return place_params(cfg, host_array, mesh=mesh, rules=rules), cfg
