"""The paged KV cache: allocator, paged attention against dense attention, shared group pages,
continuing a retained sequence, and running out of pages."""

import jax.numpy as jnp
import numpy as np
import pytest

from inference_worker.engine import Engine, SamplingParams
from inference_worker.engine.pages import OutOfPages, PageAllocator
from rlax_tpu import models
from rlax_tpu.kernels import paged_decode_attention, paged_prefill_attention, reference
from tests.helpers.hf_models import make_hf_model


def test_allocator_refcounts_and_free_list():
    a = PageAllocator(6)
    assert (a.usable, a.free_count) == (5, 5)
    pages = a.alloc(3)
    assert pages == [1, 2, 3] and 0 not in pages  # page 0 is the reserved null page
    a.share(pages[:2])
    assert [a.refcount(p) for p in pages] == [2, 2, 1]
    with pytest.raises(OutOfPages):
        a.alloc(3)
    assert a.free_count == 2  # a failed alloc takes nothing
    a.free(pages)
    assert (a.free_count, [a.refcount(p) for p in pages]) == (3, [1, 1, 0])
    assert a.alloc(1) == [3]  # freed pages are reused
    a.free(pages[:2])
    assert a.used_count == 1
    with pytest.raises(ValueError, match="not allocated"):
        a.free([1])
    with pytest.raises(ValueError, match="not allocated"):
        a.share([4])


def test_allocator_blocks_per_shard():
    """With shards, each shard of the slots allocates from its own block (global ids), whose first
    page is its null page; a page freed goes back to its block."""
    a = PageAllocator(8, shards=2)
    assert (a.block, a.usable, a.free_count) == (4, 3, 6)
    assert a.alloc(2, 1) == [5, 6] and a.alloc(1, 0) == [1]
    assert (a.free_in(0), a.free_in(1), a.shard_of(6)) == (2, 1, 1)
    with pytest.raises(OutOfPages):
        a.alloc(2, 1)
    a.free([6])
    assert a.alloc(1, 1) == [6] and a.used_count == 3
    with pytest.raises(ValueError, match="not allocated"):
        a.free([4])  # shard 1's null page
    with pytest.raises(ValueError, match="equal blocks"):
        PageAllocator(7, shards=2)


def _paged(dense, page_size, table, rng):
    """[B, Hkv, S, D] -> pool [Hkv, P, page_size, D] holding each sequence's pages at the pool
    pages its row of ``table`` names (the other pages, page 0 included, are garbage)."""
    b, hkv, s, d = dense.shape
    n = s // page_size
    pool = rng.normal(size=(hkv, b * n + 1, page_size, d)).astype(np.float32)
    for i in range(b):
        for j in range(n):
            pool[:, table[i, j]] = dense[i, :, j * page_size:(j + 1) * page_size]
    return jnp.asarray(pool)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)])
def test_paged_attention_equals_dense_attention(hq, hkv):
    rng = np.random.default_rng(hq * 10 + hkv)
    b, s, d, ps = 3, 16, 8, 4
    k, v = (rng.normal(size=(b, hkv, s, d)).astype(np.float32) for _ in range(2))
    table = rng.permutation(np.arange(1, b * s // ps + 1)).reshape(b, s // ps).astype(np.int32)
    kp, vp = _paged(k, ps, table, rng), _paged(v, ps, table, rng)
    table = jnp.asarray(table)
    lengths = jnp.asarray([16, 5, 8], jnp.int32)  # full, inside a page, on a page boundary
    q = jnp.asarray(rng.normal(size=(b, hq, d)).astype(np.float32))
    want = reference.decode_attention_reference(q, jnp.asarray(k), jnp.asarray(v), lengths)
    np.testing.assert_allclose(paged_decode_attention(q, kp, vp, lengths, table), want, atol=1e-6)
    # Prefill of a chunk at an offset: each query attends causally to everything before it.
    t = 6
    q_start = jnp.asarray([10, 0, 2], jnp.int32)
    q_lens = jnp.asarray([6, 5, 6], jnp.int32)
    qs = jnp.asarray(rng.normal(size=(b, t, hq, d)).astype(np.float32))
    got = paged_prefill_attention(qs, kp, vp, q_start, q_lens, q_start + q_lens, table)
    # Each real query is one decode query over the positions up to its own.
    rows, cols = zip(*[(i, j) for i in range(b) for j in range(int(q_lens[i]))], strict=True)
    rows, cols = np.asarray(rows), np.asarray(cols)
    want = reference.decode_attention_reference(qs[rows, cols], jnp.asarray(k[rows]), jnp.asarray(v[rows]),
                                                jnp.asarray(np.asarray(q_start)[rows] + cols + 1))
    np.testing.assert_allclose(got[rows, cols], want, atol=1e-6)
    assert float(jnp.abs(got[1, 5:]).max()) == 0.0  # padding queries give zeros


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    hf = make_hf_model("qwen2_tied", seed=1)
    path = tmp_path_factory.mktemp("qwen2")
    hf.save_pretrained(path)
    model, cfg = models.load_hf(str(path))
    return model, cfg


@pytest.fixture(scope="module")
def small_pages(qwen2):
    """Pages of 4 positions and a pool of 16 usable pages: 2 sequences at max_seq_len."""
    model, cfg = qwen2
    return Engine(model, cfg, max_batch=4, max_seq_len=32, max_prefill_batch=4, decode_chunk=4,
                  max_decode_chunk=8, page_size=4, num_pages=17)


@pytest.fixture(scope="module")
def one_page(qwen2):
    """Every sequence in one page: nothing is shared, nothing runs short."""
    model, cfg = qwen2
    return Engine(model, cfg, max_batch=4, max_seq_len=32, max_prefill_batch=4, decode_chunk=4,
                  max_decode_chunk=8, page_size=32, num_pages=0)


PROMPT = [7, 1, 2, 8, 4, 6, 11, 9, 3, 5, 13]  # 11 tokens: 2 full pages of 4 and a partial one


def _same(got, want):
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.raw_logprobs, w.raw_logprobs, atol=1e-5)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)


def test_a_group_holds_one_copy_of_its_prompt_pages(small_pages, one_page):
    eng = small_pages
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=4, seed=3)
    rid = eng.submit(PROMPT, params, retain=True)
    while eng.step():
        pass
    ((done_id, group),) = eng.take_finished()
    assert done_id == rid and len({tuple(c.tokens) for c in group}) > 1
    # Each sample caches 11 + 6 - 1 = 16 positions: 4 pages, of which the prompt's 2 full pages are
    # shared (one copy, 4 references) and the partly filled third is copied per sample.
    seqs = [eng._retained[(rid, i)] for i in range(4)]
    shared = seqs[0].pages[:2]
    assert all(s.pages[:2] == shared for s in seqs)
    assert [eng.allocator.refcount(p) for p in shared] == [4, 4]
    assert len({p for s in seqs for p in s.pages[2:]}) == 8
    assert eng.pages_in_use == 2 + 4 * 2  # dense per-sample caches would hold 4 * 4
    eng.release(rid)
    assert eng.pages_in_use == 0
    # Sharing and copy-on-write change nothing: the same group with every sequence in one page.
    _same(group, one_page.generate([PROMPT], params)[0])


def test_extending_a_retained_sequence_equals_prefilling_the_whole_sequence(small_pages, one_page):
    eng = small_pages
    greedy = SamplingParams(temperature=0.0, max_new_tokens=5, n=2)
    rid = eng.submit(PROMPT, greedy)
    eng.retain(rid)
    while eng.step():
        pass
    ((_, first),) = eng.take_finished()
    turn = [17, 23, 4]
    before = eng.stats["prefill_tokens"]
    cont = eng.extend(rid, turn, SamplingParams(temperature=0.0, max_new_tokens=7), sample=1)
    with pytest.raises(ValueError, match="not retained"):
        eng.extend(rid, turn, greedy, sample=1)  # extend consumes the retained sequence
    while eng.step():
        pass
    ((cont_id, (second,)),) = eng.take_finished()
    assert cont_id == cont
    # Only the new tokens and turn 1's last sampled token (no step had written its K/V) are prefilled.
    assert eng.stats["prefill_tokens"] - before == len(turn) + 1
    whole = PROMPT + first[1].tokens + turn
    (fresh,) = one_page.generate([whole], SamplingParams(temperature=0.0, max_new_tokens=7))[0]
    assert second.tokens == fresh.tokens
    np.testing.assert_allclose(second.raw_logprobs, fresh.raw_logprobs, atol=1e-5)
    eng.release(rid)  # sample 0
    assert eng.pages_in_use == 0


def test_out_of_pages_waits_or_preempts_and_gives_the_same_completions(small_pages, one_page):
    eng = small_pages
    prompts = [[5, 9, 3], [42], [3, 3, 3, 3, 3, 17], [8, 2]]
    params = [SamplingParams(temperature=0.0, max_new_tokens=22), SamplingParams(temperature=1.0, max_new_tokens=20,
                                                                                  seed=5, n=2),
              SamplingParams(temperature=0.0, max_new_tokens=18), SamplingParams(temperature=0.7, max_new_tokens=22)]
    before = dict(eng.stats)
    got = eng.generate(prompts, params)  # 5 sequences of up to 6 pages each in a pool of 16
    assert eng.stats["preemptions"] > before.get("preemptions", 0)
    assert eng.stats["page_waits"] > before.get("page_waits", 0)
    assert eng.stats["peak_pages"] <= 16 and eng.pages_in_use == 0
    for g, w in zip(got, one_page.generate(prompts, params), strict=True):
        _same(g, w)


def test_requests_that_never_fit_get_errors_naming_the_pages(small_pages):
    eng = small_pages
    # 20 prompt + 20 new tokens capped at max_seq_len 32: 31 positions need 8 pages; the pool has 16.
    (c,) = eng.generate([list(range(1, 21))], SamplingParams(temperature=1.0, max_new_tokens=20))[0]
    assert c.finish_reason == "cache"
    tiny = Engine(*eng_model(eng), max_batch=2, max_seq_len=32, max_prefill_batch=2, decode_chunk=4,
                  max_decode_chunk=8, page_size=4, num_pages=5)
    (c,) = tiny.generate([list(range(1, 21))], SamplingParams(temperature=1.0, max_new_tokens=4))[0]
    assert c.finish_reason == "error" and "needs 6 KV pages of page_size=4" in c.error and "num_pages=5" in c.error
    with pytest.raises(ValueError, match="KV pages"):
        tiny.submit(list(range(1, 21)), SamplingParams(temperature=1.0, max_new_tokens=4))


def eng_model(eng):
    from flax import nnx

    return nnx.merge(eng._graphdef, eng.params), eng.model_cfg


def test_config_fields_reach_the_engine(qwen2):
    from rlax_tpu.config import ConfigError, get_base_config
    from rlax_tpu.config.sections import inference

    config = get_base_config()
    config.inference.page_size, config.inference.num_pages = 8, 40
    eng = Engine.from_config(config.inference, *qwen2)
    assert (eng.page_size, eng.allocator.num_pages) == (8, 40)
    config.inference.num_pages = 1
    with pytest.raises(ConfigError, match="inference.num_pages"):
        inference.validate(config.inference, config)
    config.inference.num_pages, config.inference.page_size = 0, 0
    with pytest.raises(ConfigError, match="inference.page_size"):
        inference.validate(config.inference, config)
