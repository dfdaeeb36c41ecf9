"""ModelConfig: the plain-Python description of one decoder-only transformer."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rlax_tpu.config.errors import ConfigError

ARCHS = ("llama", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16")
IMPLS = ("auto", "pallas", "reference")
# The trainer's master weights (and so its checkpoints): float32 whatever the compute dtype is;
# Adam on bf16 weights would round most small updates away.
MASTER_DTYPE = "float32"
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def section_numerics() -> dict:
    """config.model's default numerics (attention_impl, logprob_chunk) for a checkpoint read
    without overrides: the section is where they are defined."""
    from rlax_tpu.config.sections import model as model_section

    d = model_section.defaults()
    return dict(attention_impl=d.attention_impl, logprob_chunk=d.logprob_chunk)


def resolve_dtype(name: str) -> str:
    """A config dtype: 'auto' is bfloat16 on an accelerator (TPU/GPU) and float32 on CPU."""
    if name != "auto":
        return name
    return "bfloat16" if jax.default_backend() in ("tpu", "gpu") else "float32"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a Llama / Qwen2 / Qwen3 style model (hashable, jit-static).

    ``param_dtype`` is the dtype the params are created or loaded in (the trainer's: float32
    masters); ``dtype`` the compute dtype of activations and matmul inputs.
    """

    # Every field is given by whoever builds one: from_config (config.model), a checkpoint
    # reader (its file, with config.model's numerics) or the store's model.json; no defaults here.
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    # None, or a Llama-3 style tuple of (key, value) pairs (see ROPE_SCALING_KEYS); a tuple keeps
    # the dataclass hashable. A dict or a list of pairs is converted by __post_init__.
    rope_scaling: Any
    rms_norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tie_embeddings: bool
    max_position_embeddings: int
    arch: str
    param_dtype: str
    dtype: str
    attention_impl: str
    logprob_chunk: int

    def __post_init__(self):
        # A dict, or the list of [key, value] pairs that JSON gives back for the tuple: the same
        # sorted tuple of pairs, so a config read from the store equals (and hashes as) the writer's.
        if isinstance(self.rope_scaling, dict | list | tuple):
            items = self.rope_scaling.items() if isinstance(self.rope_scaling, dict) else self.rope_scaling
            object.__setattr__(self, "rope_scaling", tuple(sorted((str(k), v) for k, v in items)))
        self.validate()

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(field: str, msg: str):
            raise ConfigError(f"model.{field}", msg)

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings", "logprob_chunk"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(f, f"must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            fail("num_kv_heads", f"num_heads={self.num_heads} must be a multiple of "
                 f"num_kv_heads={self.num_kv_heads}")
        if not self.rope_theta > 0:
            fail("rope_theta", f"must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            fail("rms_norm_eps", f"must be positive, got {self.rms_norm_eps!r}")
        if self.arch not in ARCHS:
            fail("arch", f"must be one of {ARCHS}, got {self.arch!r}")
        for f in ("param_dtype", "dtype"):
            if getattr(self, f) not in DTYPES:
                fail(f, f"must be one of {DTYPES}, got {getattr(self, f)!r}")
        if self.attention_impl not in IMPLS:
            fail("attention_impl", f"must be one of {IMPLS}, got {self.attention_impl!r}")
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            missing = [k for k in ROPE_SCALING_KEYS if k not in rs]
            extra = [k for k in rs if k not in ROPE_SCALING_KEYS]
            if missing or extra:
                fail("rope_scaling", f"Llama-3 rope scaling needs exactly {ROPE_SCALING_KEYS}; "
                     f"missing {missing}, unexpected {extra}")
            if not (rs["factor"] > 0 and rs["high_freq_factor"] > rs["low_freq_factor"] > 0
                    and rs["original_max_position_embeddings"] > 0):
                fail("rope_scaling", f"needs factor > 0, high_freq_factor > low_freq_factor > 0, "
                     f"original_max_position_embeddings > 0; got {rs}")

    # -- derived ---------------------------------------------------------------------------
    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_config(cls, c) -> ModelConfig:
        """Builds from the ``config.model`` ml-collections section (architecture fields and the
        compute dtype; params are float32, the trainer's master weights).

        The family fixes the per-family switches: qwen2 -> qkv_bias, qwen3 -> qk_norm.
        """
        head_dim = c.head_dim or (c.hidden_size // c.num_heads if c.num_heads else 0)
        rope_scaling = None
        if c.rope_scaling_factor:
            rope_scaling = {
                "factor": float(c.rope_scaling_factor),
                "low_freq_factor": float(c.rope_low_freq_factor),
                "high_freq_factor": float(c.rope_high_freq_factor),
                "original_max_position_embeddings": int(c.rope_original_max_position_embeddings),
            }
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
            head_dim=head_dim, rope_theta=float(c.rope_theta), rope_scaling=rope_scaling,
            rms_norm_eps=float(c.rms_norm_eps), qkv_bias=c.arch == "qwen2", qk_norm=c.arch == "qwen3",
            tie_embeddings=bool(c.tie_embeddings), max_position_embeddings=c.max_position_embeddings,
            arch=c.arch, param_dtype=MASTER_DTYPE, dtype=resolve_dtype(c.dtype),
            attention_impl=c.attention_impl,
            logprob_chunk=c.logprob_chunk,
        )
