"""config.model: the transformer (Llama / Qwen2 / Qwen3 family)."""

import ml_collections

from rlax_tpu.config.sections._checks import one_of, positive, require

SECTION = "model"
DTYPES = ("float32", "bfloat16")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # A pretrained checkpoint: a Hugging Face directory (config.json + *.safetensors) or a
    # llama.cpp .gguf file. When set, the architecture fields below are read from it and these
    # values are ignored.
    c.hf_path = ""
    # Architecture family when building from the fields below: 'llama', 'qwen2' or 'qwen3'.
    c.arch = "qwen2"
    c.vocab_size = 512
    c.hidden_size = 128
    c.intermediate_size = 384
    c.num_layers = 2
    c.num_heads = 4
    c.num_kv_heads = 2
    # Per-head dimension; 0 means hidden_size // num_heads.
    c.head_dim = 0
    c.rope_theta = 10000.0
    # Llama-3 style rope scaling; rope_scaling_factor = 0 disables it (plain RoPE).
    c.rope_scaling_factor = 0.0
    c.rope_low_freq_factor = 1.0
    c.rope_high_freq_factor = 4.0
    c.rope_original_max_position_embeddings = 8192
    c.rms_norm_eps = 1e-6
    c.max_position_embeddings = 2048
    # Whether the output projection shares the embedding matrix.
    c.tie_embeddings = True
    # Compute dtype: activations and matmul inputs of the trainer's forward and of the engine
    # (KV cache included): 'float32', 'bfloat16', or 'auto' (bfloat16 on TPU/GPU, float32 on CPU;
    # each process decides by its own backend, and workers take the trainer's from the run's model
    # config). It never sets a stored dtype: the trainer keeps float32 master weights and float32
    # optimizer state and casts them to this dtype inside each jitted step (checkpoints hold the
    # float32 masters); workers hold the weights as published (store.publish_dtype); a one-shot
    # evaluation of a checkpoint loads it in this dtype. Softmax statistics, logits and log-probs
    # are float32 whatever it says.
    c.dtype = "float32"
    # Attention implementation: 'auto' (Pallas on TPU/GPU, jnp on CPU), 'pallas', 'reference'.
    c.attention_impl = "auto"
    # Vocabulary chunk for target log-probs: the [B, T, V] logits are never built at once.
    c.logprob_chunk = 1024
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    one_of(SECTION, c, "arch", ("llama", "qwen2", "qwen3"))
    one_of(SECTION, c, "dtype", DTYPES + ("auto",))
    one_of(SECTION, c, "attention_impl", ("auto", "pallas", "reference"))
    if c.hf_path:
        return
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "max_position_embeddings", "logprob_chunk"):
        positive(SECTION, c, f)
    require(c.num_heads % c.num_kv_heads == 0, "model.num_kv_heads",
            f"num_heads={c.num_heads} must be a multiple of num_kv_heads={c.num_kv_heads}")
    require(c.head_dim > 0 or c.hidden_size % c.num_heads == 0, "model.head_dim",
            "is 0 (derived) but hidden_size is not divisible by num_heads")
    positive(SECTION, c, "head_dim", allow_zero=True)
    positive(SECTION, c, "rope_theta")
    positive(SECTION, c, "rope_scaling_factor", allow_zero=True)
    if c.rope_scaling_factor:
        require(c.rope_high_freq_factor > c.rope_low_freq_factor > 0, "model.rope_high_freq_factor",
                f"needs rope_high_freq_factor > rope_low_freq_factor > 0, got "
                f"{c.rope_high_freq_factor} and {c.rope_low_freq_factor}")
        positive(SECTION, c, "rope_original_max_position_embeddings")
