"""Tiny random transformers models (torch CPU) built inside the tests, plus padded batches."""

from __future__ import annotations

import jax
import numpy as np

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, attn_implementation="eager")

# name -> (config class name, extra config kwargs)
KINDS = {
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen3_untied": ("Qwen3", dict(tie_word_embeddings=False, head_dim=32, rope_theta=1000000.0)),
    "llama3_scaled": ("Llama", dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_tied": ("Llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),
}


def make_hf_model(kind: str, seed: int = 0, **config_kw):
    """A random eval-mode HF model with every weight (norms, biases too) perturbed, so a wrong
    mapping of any tensor shows in the logits; ``config_kw`` override the config (e.g. vocab_size)."""
    import torch
    import transformers

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(seed)
    family, extra = KINDS[kind]
    cfg = getattr(transformers, f"{family}Config")(**{**COMMON, **extra, **config_kw})
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def left_padded_batch(lengths, t: int, seed: int = 0):
    """tokens, mask (= segment ids), positions for left-padded rows of the given lengths."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    tokens = rng.integers(0, VOCAB, size=(b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.int32)
    for i, n in enumerate(lengths):
        mask[i, t - n:] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    tokens = np.where(mask == 1, tokens, 0).astype(np.int32)
    return tokens, mask, positions


@jax.jit
def forward(model, tokens, positions, segment_ids):
    """Our model's logits, jitted once per shape."""
    return model(tokens, positions, segment_ids)
