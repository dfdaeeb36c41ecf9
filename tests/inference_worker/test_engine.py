"""The engine: parity with transformers, continuous batching, stops, weights swap, bad input."""

import jax
import numpy as np
import pytest

from inference_worker.engine import Engine, SamplingParams
from rlax_tpu import models
from tests.helpers.hf_models import make_hf_model


@pytest.fixture(scope="module")
def hf_qwen2(tmp_path_factory):
    hf = make_hf_model("qwen2_tied", seed=1)
    path = tmp_path_factory.mktemp("qwen2")
    hf.save_pretrained(path)
    model, cfg = models.load_hf(str(path))
    return hf, model, cfg


@pytest.fixture(scope="module")
def engine(hf_qwen2):
    _, model, cfg = hf_qwen2
    return Engine(model, cfg, max_batch=4, max_seq_len=48, max_prefill_batch=4, decode_chunk=4, max_decode_chunk=64,
                  page_size=16, num_pages=0)


PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4, 6, 11], [42], [3, 3, 3, 3, 3, 17, 18, 19, 20, 21, 22]]


def _hf_greedy(hf, prompt, new_tokens):
    import torch

    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _hf_logprobs(hf, prompt, completion):
    import torch

    ids = torch.tensor([prompt + completion], dtype=torch.long)
    with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=ids).logits.float(), dim=-1)[0]
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion)]


def test_greedy_matches_transformers_and_raw_logprobs_match(hf_qwen2, engine):
    hf, _, _ = hf_qwen2
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12))
    for prompt, (completion,) in zip(PROMPTS, outs, strict=True):
        assert completion.finish_reason == "length"
        assert completion.tokens == _hf_greedy(hf, prompt, 12)
        np.testing.assert_allclose(completion.raw_logprobs, _hf_logprobs(hf, prompt, completion.tokens),
                                   atol=1e-4)
        assert completion.logprobs == [0.0] * 12  # greedy: a point mass


def test_sampled_logprobs_match_the_model_at_temperature_one(hf_qwen2, engine):
    hf, _, _ = hf_qwen2
    (out,) = engine.generate([PROMPTS[1]], SamplingParams(temperature=1.0, max_new_tokens=10, seed=3))
    c = out[0]
    np.testing.assert_allclose(c.raw_logprobs, _hf_logprobs(hf, PROMPTS[1], c.tokens), atol=1e-4)
    np.testing.assert_allclose(c.logprobs, c.raw_logprobs, atol=1e-5)  # no truncation, T=1


def test_continuous_batching_refills_slots_and_equals_requests_run_alone(engine):
    lengths = [30, 2, 3, 25, 1, 4, 20, 2]  # very different output lengths, 8 requests > 4 slots
    prompts = [PROMPTS[i % 4] for i in range(8)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in lengths]
    before = dict(engine.stats)
    together = engine.generate(prompts, params)
    refills = engine.stats["slot_refills"] - before.get("slot_refills", 0)
    assert refills > 0
    for prompt, p, (c,) in zip(prompts, params, together, strict=True):
        assert len(c.tokens) == p.max_new_tokens
        (alone,) = engine.generate([prompt], p)[0]
        assert alone.tokens == c.tokens


def test_n_samples_share_one_prefill_and_seeds_are_reproducible(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=4, seed=7)
    calls = engine.stats["prefill_calls"]
    first = engine.generate([PROMPTS[0]], params)[0]
    assert engine.stats["prefill_calls"] == calls + 1
    assert len({tuple(c.tokens) for c in first}) > 1  # different samples
    again = engine.generate([PROMPTS[2], PROMPTS[0]], [params, params])[1]  # other batch company
    assert [c.tokens for c in again] == [c.tokens for c in first]
    other_seed = engine.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_new_tokens=8, n=4, seed=8))
    assert [c.tokens for c in other_seed[0]] != [c.tokens for c in first]


def test_groups_larger_than_the_slot_count_are_served(engine):
    out = engine.generate([PROMPTS[1]], SamplingParams(temperature=1.0, max_new_tokens=3, n=9, seed=1))[0]
    assert len(out) == 9 and all(len(c.tokens) == 3 for c in out)


def test_stops_eos_sequence_and_cache(engine):
    (greedy,) = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=12))[0]
    eos = greedy.tokens[5]
    (c,) = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=12,
                                                         stop_token_ids=(eos,)))[0]
    assert c.finish_reason == "eos" and c.tokens == greedy.tokens[: greedy.tokens.index(eos) + 1]
    seq = tuple(greedy.tokens[3:5])
    (c,) = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=12,
                                                         stop_sequences=(seq,)))[0]
    assert c.finish_reason == "stop" and tuple(c.tokens[-2:]) == seq and len(c.tokens) <= 5
    long_prompt = list(range(1, 45))  # 44 tokens in a 48-token cache: 4 may be generated
    (c,) = engine.generate([long_prompt], SamplingParams(temperature=0.0, max_new_tokens=20))[0]
    assert c.finish_reason == "cache" and len(c.tokens) == 4


def test_decode_chunk_grows_when_nothing_waits_and_stops_when_all_slots_end(hf_qwen2):
    _, model, cfg = hf_qwen2
    eng = Engine(model, cfg, max_batch=4, max_seq_len=48, max_prefill_batch=4, decode_chunk=2, max_decode_chunk=8,
                 page_size=16, num_pages=0)
    # 3 requests in 4 slots: nothing waits, so chunks of up to 8 cover the 19 tokens after the
    # first in 3 calls (decode_chunk alone: 10); the last chunk (4) stops after 3 steps, when the
    # budgets run out.
    out = eng.generate(PROMPTS[:3], SamplingParams(temperature=0.0, max_new_tokens=20))
    assert all(len(c.tokens) == 20 for (c,) in out)
    assert eng.stats["decode_calls"] == 3 and eng.stats["decode_steps"] == 19
    # A request ending on a stop id early: the loop exits when its slot stops, not at the chunk end.
    (greedy,) = out[1]
    eos = greedy.tokens[2]
    before = dict(eng.stats)
    (c,) = eng.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=(eos,)))[0]
    assert c.finish_reason == "eos" and c.tokens == greedy.tokens[: greedy.tokens.index(eos) + 1]
    assert eng.stats["decode_steps"] - before["decode_steps"] == len(c.tokens) - 1
    # Requests waiting for a slot keep the short chunk, so freed slots refill promptly; results
    # equal those of the plain engine.
    prompts = [PROMPTS[i % 4] for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in (3, 20, 2, 9, 5, 1)]
    together = eng.generate(prompts, params)
    for prompt, p, (c,) in zip(prompts, params, together, strict=True):
        assert c.tokens == eng.generate([prompt], p)[0][0].tokens and len(c.tokens) == p.max_new_tokens


def test_bad_requests_get_errors_and_do_not_kill_the_batch(engine):
    good = SamplingParams(temperature=0.0, max_new_tokens=4)
    outs = engine.generate(
        [PROMPTS[0], [], list(range(60)), PROMPTS[1], [1, 10**6]],
        [good, good, good, SamplingParams(temperature=1.0, max_new_tokens=4, top_p=0.0), good])
    assert outs[0][0].finish_reason == "length" and len(outs[0][0].tokens) == 4
    assert outs[1][0].finish_reason == "error" and "empty prompt" in outs[1][0].error
    assert "does not fit the KV cache" in outs[2][0].error
    assert "top_p" in outs[3][0].error
    assert "outside" in outs[4][0].error


def test_weight_swap_changes_outputs_without_recompiling(hf_qwen2):
    _, model, cfg = hf_qwen2
    engine = Engine(model, cfg, max_batch=2, max_seq_len=32, max_prefill_batch=2, decode_chunk=4, max_decode_chunk=64,
                    page_size=16, num_pages=0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = engine.generate([PROMPTS[0]], greedy)[0][0].tokens
    sizes = (engine._decode._cache_size(), engine._prefill_fn._cache_size())
    other = models.init(cfg, seed=5)
    from flax import nnx

    engine.update_params(nnx.to_pure_dict(nnx.state(other)))
    after = engine.generate([PROMPTS[0]], greedy)[0][0].tokens
    assert after != before
    assert (engine._decode._cache_size(), engine._prefill_fn._cache_size()) == sizes
    with pytest.raises(ValueError, match="does not match"):
        engine.update_params(nnx.state(models.init(cfg.replace(intermediate_size=64), seed=0)))


def test_tensor_parallel_engine_on_8_devices_matches_single_device(hf_qwen2, engine):
    from flax import nnx

    from rlax_tpu import sharding

    _, model, cfg = hf_qwen2
    mesh = jax.make_mesh((1, 1, 2), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:2])
    state = nnx.state(model)
    shardings = sharding.param_shardings(model, mesh, sharding.INFERENCE_RULES)
    sharded = nnx.merge(nnx.graphdef(model), jax.device_put(state, shardings))
    tp = Engine(sharded, cfg, max_batch=4, max_seq_len=48, max_prefill_batch=4, decode_chunk=4, max_decode_chunk=64,
                mesh=mesh, page_size=16, num_pages=0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    assert [o[0].tokens for o in tp.generate(PROMPTS, greedy)] == \
        [o[0].tokens for o in engine.generate(PROMPTS, greedy)]
    assert len(tp._state.cache.k[0].sharding.device_set) == 2


@pytest.mark.parametrize("mesh_shape", [(2, 1, 2), (1, 4, 1)])  # data x tensor, fsdp
def test_slots_over_a_data_mesh_match_single_device(hf_qwen2, engine, mesh_shape):
    """Slots split over the data axes give the same completions as one device, under continuous
    batching with n > 1 groups and a top-k/top-p mix."""
    from flax import nnx

    from rlax_tpu import sharding

    _, model, cfg = hf_qwen2
    n_dev = int(np.prod(mesh_shape))
    mesh = jax.make_mesh(mesh_shape, sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:n_dev])
    placed = jax.device_put(nnx.state(model), sharding.param_shardings(model, mesh, sharding.INFERENCE_RULES))
    dp = Engine(nnx.merge(nnx.graphdef(model), placed), cfg, max_batch=4, max_seq_len=48, max_prefill_batch=3,
                decode_chunk=4, max_decode_chunk=64, mesh=mesh, page_size=16, num_pages=0)
    prompts = [PROMPTS[i % 4] for i in range(7)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in (9, 2, 5, 1, 7, 3, 4)]
    params[1] = SamplingParams(temperature=1.0, top_k=5, top_p=0.9, max_new_tokens=6, n=3, seed=4)
    params[4] = SamplingParams(temperature=0.8, max_new_tokens=5, n=2, seed=2, stop_token_ids=(3,))
    want = engine.generate(prompts, params)
    got = dp.generate(prompts, params)
    for w, g in zip(want, got, strict=True):
        assert [c.tokens for c in g] == [c.tokens for c in w]
        assert [c.finish_reason for c in g] == [c.finish_reason for c in w]
        for cw, cg in zip(w, g, strict=True):
            np.testing.assert_allclose(cg.raw_logprobs, cw.raw_logprobs, atol=1e-5)
            np.testing.assert_allclose(cg.logprobs, cw.logprobs, atol=1e-5)
    assert dp.stats["slot_refills"] > 0
    assert len(dp._state.cache.k[0].sharding.device_set) == n_dev
    with pytest.raises(ValueError, match="max_batch=3 must divide"):
        Engine(model, cfg, max_batch=3, max_seq_len=48, max_prefill_batch=3, decode_chunk=4, max_decode_chunk=64,
               mesh=mesh, page_size=16, num_pages=0)


@pytest.mark.parametrize("kind", ["llama3_scaled", "qwen3_untied"])  # Llama-3 rope scaling; Qwen3 q/k norms
def test_llama_and_qwen3_greedy_and_logprobs_match_transformers(tmp_path, kind):
    hf = make_hf_model(kind, seed=2)
    hf.save_pretrained(tmp_path)
    model, cfg = models.load_hf(str(tmp_path))
    engine = Engine(model, cfg, max_batch=4, max_seq_len=32, max_prefill_batch=4, decode_chunk=8, max_decode_chunk=64,
                    page_size=16, num_pages=0)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10))
    for prompt, (c,) in zip(PROMPTS, outs, strict=True):
        assert c.tokens == _hf_greedy(hf, prompt, 10)
        np.testing.assert_allclose(c.raw_logprobs, _hf_logprobs(hf, prompt, c.tokens), atol=1e-4)


def _reference_stop(tokens, prompt_len, p, max_seq_len):
    """The per-token stop rules: (tokens kept, finish reason)."""
    out = []
    for tok in tokens:
        out.append(tok)
        if tok in p.stop_token_ids:
            return out, "eos"
        if any(len(out) >= len(q) and tuple(out[-len(q):]) == q for q in p.stop_sequences):
            return out, "stop"
        if len(out) >= p.max_new_tokens:
            return out, "length"
        if prompt_len + len(out) >= max_seq_len:
            return out, "cache"
    return out, ""


def test_vectorized_stop_rules_match_per_token_rules(engine):
    from inference_worker.engine.sequences import Completion, Seq, append_tokens

    rng = np.random.default_rng(0)
    for _ in range(300):
        p = SamplingParams(
            temperature=1.0, max_new_tokens=int(rng.integers(1, 30)),
            stop_token_ids=tuple(int(t) for t in rng.choice(6, size=rng.integers(0, 3), replace=False)),
            stop_sequences=tuple(tuple(int(t) for t in rng.integers(0, 6, size=rng.integers(1, 4)))
                                 for _ in range(rng.integers(0, 3))))
        prompt_len = int(rng.integers(1, engine.max_seq_len))
        stream = rng.integers(0, 6, size=60)
        want_tokens, want_reason = _reference_stop(stream.tolist(), prompt_len, p, engine.max_seq_len)
        seq = Seq(0, 0, [1] * prompt_len, p, [], Completion([], [], [], ""))
        pos = 0
        while pos < len(stream):
            n = int(rng.integers(1, 7))
            chunk = stream[pos: pos + n]
            append_tokens(seq, chunk, chunk.astype(np.float32), -chunk.astype(np.float32), engine.max_seq_len)
            pos += n
        c = seq.completion
        assert (c.tokens, c.finish_reason) == (want_tokens, want_reason), (p, prompt_len)
        assert c.logprobs == [float(t) for t in want_tokens]
        assert c.raw_logprobs == [-float(t) for t in want_tokens]
