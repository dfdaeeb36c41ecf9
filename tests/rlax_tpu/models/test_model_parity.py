"""Our Transformer against transformers (torch CPU) on tiny random models, plus the model's own
entry points: packed batches, chunked target log-probs; the engine's inference view (prefill +
decode over a KV cache) against the training forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlax_tpu import models
from rlax_tpu.models import ModelConfig, Transformer
from rlax_tpu.models.logprobs import chunked_target_logprobs
from tests.helpers.hf_models import KINDS, VOCAB, forward, hf_logits, left_padded_batch, make_hf_model

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (hf model, saved directory), built once for the module."""
    out = {}
    for kind in KINDS:
        hf = make_hf_model(kind)
        path = str(tmp_path_factory.mktemp(kind))
        hf.save_pretrained(path)
        out[kind] = (hf, path)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_transformers_left_padded(checkpoints, kind):
    hf, path = checkpoints[kind]
    model, cfg = models.load_hf(path)
    assert cfg.arch == {"Qwen2": "qwen2", "Qwen3": "qwen3", "Llama": "llama"}[KINDS[kind][0]]
    assert cfg.tie_embeddings == KINDS[kind][1]["tie_word_embeddings"]
    tokens, mask, pos = left_padded_batch([12, 7, 3], 12, seed=1)
    ours = np.asarray(forward(model, tokens, pos, mask))
    ref = hf_logits(hf, tokens, mask, pos)
    valid = mask.astype(bool)
    assert np.abs(ref[valid]).max() > 1.0  # non-trivial logits, so the tolerance means something
    np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=0)


def test_rope_scaling_config_read(checkpoints):
    _, cfg = models.load_hf(checkpoints["llama3_scaled"][1])
    assert cfg.rope_scaling_dict == dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=16)
    _, cfg = models.load_hf(checkpoints["qwen3_untied"][1])
    assert cfg.head_dim == 32 and cfg.qk_norm and cfg.rope_scaling is None


def test_packed_batch_equals_separate(checkpoints):
    model, _ = models.load_hf(checkpoints["qwen3_untied"][1])
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, VOCAB, 5), rng.integers(0, VOCAB, 4)
    # Row 0: a and b packed (+1 padding slot); rows 1, 2: a and b alone, right-padded.
    tokens = np.zeros((3, 10), np.int32)
    tokens[0, :9] = np.concatenate([a, b])
    tokens[1, :5], tokens[2, :4] = a, b
    seg = np.array([[1] * 5 + [2] * 4 + [0], [1] * 5 + [0] * 5, [1] * 4 + [0] * 6], np.int32)
    pos = np.array([list(range(5)) + list(range(4)) + [0], list(range(10)), list(range(10))], np.int32)
    out = np.asarray(forward(model, tokens, pos, seg))
    np.testing.assert_allclose(out[0, :5], out[1, :5], atol=TOL, rtol=0)
    np.testing.assert_allclose(out[0, 5:9], out[2, :4], atol=TOL, rtol=0)


# -- chunked target log-probs --------------------------------------------------------------------
def _small_cfg(tie: bool, vocab: int = 50, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=8, arch="qwen2", qkv_bias=True, qk_norm=False, tie_embeddings=tie, rope_theta=10000.0,
                rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=2048, param_dtype="float32",
                dtype="float32", attention_impl="auto", logprob_chunk=1024)
    return ModelConfig(**{**base, **kw})


def test_target_logprobs_value_entropy_and_grad():
    """Chunk 16 does not divide V = 50 (3 scanned chunks + a tail). Gradients against the
    full-logits gradient (tied embeddings: both uses of the embedding), also with remat on;
    values for the untied head too. All in one jit: XLA:CPU compiles are the cost here."""
    tokens, mask, pos = left_padded_batch([6, 4], 6, seed=5)
    tokens = tokens % 50
    targets = np.roll(tokens, -1, axis=1)
    w = jnp.asarray(np.random.default_rng(0).normal(size=tokens.shape), jnp.float32)
    cfg = _small_cfg(True)
    gdef, state = nnx.split(models.init(cfg, seed=1))
    gdef_u, state_u = nnx.split(models.init(_small_cfg(False), seed=1))

    def chunked(state, gdef=gdef, remat=False):
        model = nnx.merge(gdef, state)
        h = model.hidden(tokens, pos, mask, remat=remat)
        lp, ent = chunked_target_logprobs(h, model.output_weight(), targets, 16, True)
        return jnp.sum(lp * w) + 0.3 * jnp.sum(ent * w), (lp, ent)

    def full(state, gdef=gdef):
        logp = jax.nn.log_softmax(nnx.merge(gdef, state)(tokens, pos, mask), axis=-1)
        lp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp) * logp, -1)
        return jnp.sum(lp * w) + 0.3 * jnp.sum(ent * w), (lp, ent)

    @jax.jit
    def run(state, state_u):
        vg = lambda f, **kw: jax.value_and_grad(lambda s: f(s, **kw), has_aux=True)(state)
        untied = (chunked(state_u, gdef=gdef_u)[1], full(state_u, gdef=gdef_u)[1])
        return vg(chunked), vg(full), vg(chunked, remat=True), untied

    ((_, (lp_c, ent_c)), g_c), ((_, (lp_f, ent_f)), g_f), ((_, (lp_r, _)), g_r), untied = run(state, state_u)
    for a, b in [(lp_c, lp_f), (ent_c, ent_f), (lp_r, lp_f), *zip(*untied, strict=True)]:
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b, r in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_f), jax.tree.leaves(g_r), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(r, a, atol=1e-6)


def test_target_logprobs_backward_never_holds_full_logits():
    """Compiled temp memory of the chunked gradient stays well below one [B, T, V] f32 array
    (a full-logits gradient needs at least that much: the softmax residual)."""
    vocab, b, t = 8192, 2, 64
    gdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(_small_cfg(True, vocab), rngs=nnx.Rngs(0))))
    tokens = jnp.zeros((b, t), jnp.int32)
    loss = lambda s: nnx.merge(gdef, s).target_logprobs(tokens, tokens, chunk=512).sum()
    temp = jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes
    assert temp < b * t * vocab * 4 / 2, temp


# -- the engine's inference view: prefill + decode -----------------------------------------------
def test_engine_prefill_then_decode_matches_the_training_forward(checkpoints):
    from inference_worker.engine import fast_model

    model, cfg = models.load_hf(checkpoints["qwen3_untied"][1])
    lengths = np.array([5, 2, 7], np.int32)
    b, t, steps = len(lengths), int(lengths.max()), 4  # at most 11 positions: 3 pages of 4 per row
    rng = np.random.default_rng(7)
    prompts = rng.integers(0, VOCAB, size=(b, t)).astype(np.int32)
    prompts = prompts * (np.arange(t)[None] < lengths[:, None])  # right padding
    gdef, state = nnx.split(model)
    weights = jax.jit(lambda s: fast_model.build_weights(gdef, s, cfg))(state)
    # Pages of 4 positions, each row's 3 pages scattered over the pool (page 0 is the null page).
    page_size = 4
    table = jnp.asarray(rng.permutation(np.arange(1, 3 * b + 1)).reshape(b, 3).astype(np.int32))
    cache = fast_model.init_cache(cfg, 3 * b + 1, page_size)
    assert len(cache.k) == cfg.num_layers and cache.k[0].shape == (cfg.num_kv_heads, 3 * b + 1, 4, cfg.head_dim)
    prefill = jax.jit(lambda w, x, q0, n, c: fast_model.prefill(cfg, w, x, q0, n, table, c))
    logits, cache = prefill(weights, prompts, np.zeros((b,), np.int32), lengths, cache)
    decode = jax.jit(lambda w, x, pos, c: fast_model.decode_step(cfg, w, x, pos, c, table))
    seqs = [list(prompts[i, : lengths[i]]) for i in range(b)]
    step_logits = [np.asarray(logits)]
    cur = lengths.copy()
    for _ in range(steps):
        nxt = step_logits[-1].argmax(-1).astype(np.int32)
        for i in range(b):
            seqs[i].append(int(nxt[i]))
        out, cache = decode(weights, nxt, cur, cache)
        step_logits.append(np.asarray(out))
        cur = cur + 1
    # Reference: one full forward over each whole sequence (right-padded batch).
    total = max(len(s) for s in seqs)
    full_tok = np.zeros((b, total), np.int32)
    full_seg = np.zeros((b, total), np.int32)
    for i, s in enumerate(seqs):
        full_tok[i, : len(s)] = s
        full_seg[i, : len(s)] = 1
    ref = np.asarray(forward(model, full_tok, np.broadcast_to(np.arange(total), (b, total)), full_seg))
    for k, lg in enumerate(step_logits):
        np.testing.assert_allclose(lg, ref[np.arange(b), lengths - 1 + k], atol=TOL, rtol=0)


def test_bf16_forward_close_to_f32(checkpoints):
    path = checkpoints["qwen2_tied"][1]
    m32, _ = models.load_hf(path)
    m16, cfg16 = models.load_hf(path, dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16" and m16.embed[...].dtype == jnp.bfloat16
    tokens, mask, pos = left_padded_batch([6, 4], 6, seed=2)
    a, b = np.asarray(forward(m32, tokens, pos, mask)), np.asarray(forward(m16, tokens, pos, mask))
    assert b.dtype == np.float32
    valid = mask.astype(bool)
    assert np.abs(a[valid] - b[valid]).max() < 0.1 * np.abs(a[valid]).max()
