"""Every Pallas call under shard_map: the compiled HLO of the sharded train step and of the
engine's decode steps (Pallas path, interpret mode, 8 fake devices) holds no all-gather of
q/k/v or of the KV cache / page pool; without the shard_map the same programs do gather them."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from inference_worker.engine import fast_model
from rlax_tpu import kernels, models, sharding
from rlax_tpu.kernels import reference
from rlax_tpu.kernels import sharded as sharded_mod
from rlax_tpu.models.config import ModelConfig

# Distinct sizes so a gathered attention operand is recognisable by its shape: T = 24 tokens,
# D = 16, Hq = 8, Hkv = 4 (q/k/v trailing dims [24, H, 16]; caches [.., 24 or pool, 16]).
B, T, HQ, HKV, D = 4, 24, 8, 4, 16
CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=HQ,
                  num_kv_heads=HKV, head_dim=D, arch="qwen2", qkv_bias=False, qk_norm=False, tie_embeddings=False,
                  rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=2048,
                  param_dtype="float32", dtype="float32", attention_impl="pallas", logprob_chunk=1024)
COLLECTIVE = re.compile(r"=\s*\w+\[([\d,]*)\][^=]*\b(all-gather|all-reduce|all-to-all|collective-permute|"
                        r"reduce-scatter)(?:-start)?\(")
GATHER = re.compile(r"=\s*\w+\[([\d,]*)\][^=]*\ball-gather(?:-start)?\(")


def _mesh(data: int, tensor: int):
    return jax.make_mesh((data, 1, tensor), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _gathered_attention_operands(hlo: str, dims: set[tuple[int, ...]]) -> list[str]:
    """All-gathers whose result has the trailing dims of an attention operand."""
    out = []
    for m in GATHER.finditer(hlo):
        shape = tuple(int(x) for x in m.group(1).split(",") if x)
        if any(shape[-len(d):] == d for d in dims if len(shape) >= len(d)):
            out.append(m.group(0))
    return out


@pytest.fixture
def no_shard_map(monkeypatch):
    """The wrappers as they would be without shard_map: the dispatcher on GSPMD-sharded operands."""
    monkeypatch.setattr(sharded_mod, "_plan", lambda *a: None)


def _train_step_hlo(mesh) -> str:
    model = models.init(CFG, 0, mesh=mesh)
    gdef, params = nnx.split(model)
    p_sh = sharding.param_shardings(params, mesh, sharding.TRAIN_RULES)
    b_sh = sharding.batch_sharding(mesh, 2)

    def step(params, tokens):
        def loss(params):
            return -jnp.mean(nnx.merge(gdef, params).target_logprobs(tokens[:, :-1], tokens[:, 1:]))
        return jax.grad(loss)(params)

    tokens = jax.ShapeDtypeStruct((B, T + 1), jnp.int32)
    fn = kernels.under_mesh(mesh, lambda: jax.jit(step, in_shardings=(p_sh, b_sh)).lower(params, tokens))
    return fn().compile().as_text()


# q/k/v as the model makes them ([.., T, heads, D]) or as the kernel views them (T padded to the
# block, 32, and heads folded into lanes: [.., 32, heads * D]), for any number of heads per device.
QKV_DIMS = ({(t, h, D) for t in (T, 32) for h in (1, 2, 4, 8)}
            | {(t, h * D) for t in (T, 32) for h in (1, 2, 4, 8)})


def test_train_step_hlo_has_no_gather_of_qkv():
    mesh = _mesh(2, 4)  # batch over data, heads over tensor
    assert not _gathered_attention_operands(_train_step_hlo(mesh), QKV_DIMS)


def test_train_step_without_shard_map_gathers_qkv(no_shard_map):
    """The check above can fail: the unwrapped kernel call makes XLA gather q/k/v."""
    assert _gathered_attention_operands(_train_step_hlo(_mesh(2, 4)), QKV_DIMS)


def _paged_decode_hlo(mesh) -> str:
    pages, ps, n = 12, 16, 3
    row, heads = NamedSharding(mesh, P(sharding.BATCH_AXES)), "tensor"
    shardings = (NamedSharding(mesh, P(sharding.BATCH_AXES, heads, None)),
                 NamedSharding(mesh, P(heads, None, None, None)), NamedSharding(mesh, P(heads, None, None, None)),
                 row, NamedSharding(mesh, P(sharding.BATCH_AXES, None)))
    args = (jax.ShapeDtypeStruct((B, HQ, D), jnp.float32),
            jax.ShapeDtypeStruct((HKV, pages, ps, D), jnp.float32),
            jax.ShapeDtypeStruct((HKV, pages, ps, D), jnp.float32),
            jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((B, n), jnp.int32))

    def step(q, kp, vp, lengths, tables):
        return kernels.paged_decode_attention(q, kp, vp, lengths, tables, impl="pallas")

    with jax.set_mesh(mesh):
        return jax.jit(step, in_shardings=shardings).lower(*args).compile().as_text()


PAGED_DIMS = {(12, 16, D), (HQ, D), (HQ // 4, D)}  # a pool (any kv heads), q (any batch)


def test_paged_decode_step_hlo_has_no_gather_of_pages_or_q():
    assert not _gathered_attention_operands(_paged_decode_hlo(_mesh(2, 4)), PAGED_DIMS)


def test_paged_decode_without_shard_map_gathers(no_shard_map):
    assert _gathered_attention_operands(_paged_decode_hlo(_mesh(2, 4)), PAGED_DIMS)


ENGINE_PAGES = 14  # two blocks of 7 pages, one per data shard of the slots


def _engine_step_hlo(step: str) -> str:
    """The engine's decode step (fast_model.decode_step) or prefill (fast_model.prefill, a
    chunk of T = 24 tokens per row) over the paged cache on a data=2, tensor=2 mesh, with the
    engine's shardings (slots over data; pools over kv heads and, by blocks of pages, over data)
    and traced under the mesh as the engine traces it."""
    mesh = jax.make_mesh((2, 1, 2), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    cfg = CFG.replace(attention_impl="pallas")
    gdef, params = nnx.split(models.init(cfg, 0))
    weights = jax.eval_shape(lambda p: fast_model.build_weights(gdef, p, cfg), params)
    cache = jax.eval_shape(lambda: fast_model.init_cache(cfg, ENGINE_PAGES, 16))
    row, rows2 = NamedSharding(mesh, P(sharding.BATCH_AXES)), NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    shardings = (fast_model.weight_shardings(cfg, mesh), fast_model.cache_shardings(cfg, cache, mesh))
    vec, table = jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((B, 3), jnp.int32)
    if step == "decode":
        fn = jax.jit(lambda w, c, t, p, pt: fast_model.decode_step(cfg, w, t, p, c, pt),
                     in_shardings=(*shardings, row, row, rows2))
        args = (vec, vec, table)
    else:
        fn = jax.jit(lambda w, c, t, s, n, pt: fast_model.prefill(cfg, w, t, s, n, pt, c),
                     in_shardings=(*shardings, rows2, row, row, rows2))
        args = (jax.ShapeDtypeStruct((B, T), jnp.int32), vec, vec, table)
    return kernels.under_mesh(mesh, fn.lower)(weights, cache, *args).compile().as_text()


# A pool (whole or one kv head's), q [.., Hq, D] over any slots, the new K/V as written
# ([Hkv, B, (T,) D], [B, (T,) Hkv, D]) and q/k/v of a prefill chunk ([.., T, heads, (G,) D]).
ENGINE_DIMS = ({(ENGINE_PAGES, 16, D), (HQ, D), (HQ // 2, D)} | {(b, T, D) for b in (B // 2, B)}
               | {(T, h, D) for h in (1, 2, 4, 8)} | {(T, h, 2, D) for h in (1, 2, 4)})


@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_engine_steps_hlo_have_no_gather_of_cache_or_qkv(step):
    """Neither the new K/V (written into the shard's own pages and heads), nor q/k/v, nor the
    pages move between devices in the engine's decode step or its prefill."""
    hlo = _engine_step_hlo(step)
    assert not _gathered_attention_operands(hlo, ENGINE_DIMS)
    # Stricter: the only collectives left are tensor parallelism's all-reduces of hidden-sized
    # activations [.., H] (row-parallel projections, the vocab-split embedding).
    collectives = COLLECTIVE.findall(hlo)
    assert collectives and all(op == "all-reduce" and dims.split(",")[-1] == str(CFG.hidden_size)
                               for dims, op in collectives), collectives


@pytest.fixture
def no_engine_shard_map(monkeypatch):
    """The paged calls and the K/V write on GSPMD-sharded operands, as without shard_map."""
    monkeypatch.setattr(sharded_mod, "_plan", lambda *a: None)
    monkeypatch.setattr(sharded_mod, "_paged_plan", lambda *a: None)


def test_engine_decode_step_without_shard_map_gathers(no_engine_shard_map):
    assert _gathered_attention_operands(_engine_step_hlo("decode"), ENGINE_DIMS)


def test_sharded_wrappers_match_the_dispatcher():
    """Under a mesh the shard_map'd kernels give the single-device results (decode, paged decode,
    flash forward with its gradient). data=2, tensor=2: a small mesh keeps interpret mode quick."""
    mesh = jax.make_mesh((2, 1, 2), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    rng = np.random.default_rng(0)
    b, hq, hkv = 2, 4, 2  # one sequence and one kv head per device
    q, k, v = (jnp.asarray(rng.standard_normal((b, 16, h, D)), jnp.float32) for h in (hq, hkv, hkv))
    seg = jnp.asarray([[1] * 12 + [0] * 4, [1] * 5 + [2] * 11], jnp.int32)

    def loss(q, k, v):
        out = kernels.flash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="pallas")
        return jnp.sum(out * v.repeat(2, axis=2)), out

    with jax.set_mesh(mesh):
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, want), want_g = jax.value_and_grad(
        lambda q, k, v: (lambda o: (jnp.sum(o * v.repeat(2, axis=2)), o))(
            reference.flash_attention_reference(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)),
        argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-5)
    for g, w in zip(grads, want_g, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5)
    kp = jnp.asarray(rng.standard_normal((hkv, 12, 4, D)), jnp.float32)
    vp = jnp.asarray(rng.standard_normal((hkv, 12, 4, D)), jnp.float32)
    lengths, tables = jnp.array([5, 9], jnp.int32), jnp.array([[1, 2, 0], [1, 4, 5]], jnp.int32)  # shared page 1
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: kernels.paged_decode_attention(*a, impl="pallas"))(q[:, 0], kp, vp, lengths, tables)
    np.testing.assert_allclose(out, reference.paged_decode_attention_reference(q[:, 0], kp, vp, lengths, tables),
                               atol=2e-5)


def test_split_pages_needs_rows_and_pages_that_divide_over_the_batch_shards():
    mesh = _mesh(2, 1)
    q, pool = jnp.zeros((3, HQ, D)), jnp.zeros((HKV, 8, 16, D))
    with jax.set_mesh(mesh), pytest.raises(kernels.KernelError, match="3 rows and 8 pool pages must divide"):
        kernels.paged_decode_attention(q, pool, pool, jnp.ones((3,), jnp.int32), jnp.zeros((3, 2), jnp.int32),
                                       split_pages=True)
