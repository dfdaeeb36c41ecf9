"""The policy-landed check: the trainer's canary figures, the worker's check after each swap."""

import logging

import ml_collections
import numpy as np
import pytest
from flax import nnx

from inference_worker.bootstrap import abstract_params
from inference_worker.engine import Engine
from inference_worker.policy_check import PolicyCheck
from inference_worker.replay_client import ReplayWorker
from inference_worker.worker import Worker
from param_server import ParamStore, VariableClient
from rlax_tpu import canary, models, sharding
from rlax_tpu.config import ConfigError, get_base_config
from rlax_tpu.config.sections import store as store_section
from rlax_tpu.models import ModelConfig

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, arch="llama", qkv_bias=False, qk_norm=False, tie_embeddings=True,
                  rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=256,
                  param_dtype="float32", dtype="float32", attention_impl="auto", logprob_chunk=1024)


def _mesh(**axes):
    return sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, **axes}))


def _trainer_params(seed: int):
    """f32 masters in the training layout, as the trainer publishes them."""
    model = models.init(CFG, seed, mesh=_mesh(fsdp=-1), rules=sharding.TRAIN_RULES)
    return nnx.to_pure_dict(nnx.split(model)[1])


@pytest.fixture
def worker(caplog):
    """A worker's weight path (variable client, engine, replay counters, policy check) over a
    memory store; the trainer side publishes with canary figures."""
    config = get_base_config()
    store = ParamStore.open("memory://", config=config)
    publish = lambda params, step: store.publish(params, step,  # noqa: E731
                                                 canary=canary.figures(config.store, CFG, params))
    publish(_trainer_params(0), 0)
    graphdef, target = abstract_params(CFG.replace(param_dtype=config.store.publish_dtype), _mesh(tensor=-1))
    client = VariableClient(store, target, reader="w0", poll_interval_s=0.05)
    assert client.update_and_wait(timeout=60)
    w = Worker.__new__(Worker)  # the real swap hook, without the run's tokenizer, task and queue
    w.config, w.worker_id, w.store, w.client = config, "w0", store, client
    w.engine = Engine(nnx.merge(graphdef, client.params), CFG, max_batch=2, max_seq_len=32, max_prefill_batch=2,
                      decode_chunk=4, max_decode_chunk=4, page_size=8, num_pages=0)
    w.engine_version, w.weights_step = client.version, client.step
    w.replay = ReplayWorker(store.kv, "w0", lease_seconds=5, max_leases=1, heartbeat_seconds=1)
    w.policy = PolicyCheck(config, CFG, w.replay.count, "w0")
    caplog.set_level(logging.INFO)
    yield w, publish
    client.close()


def test_landed_swaps_pass_and_an_unapplied_swap_fires(worker, caplog, monkeypatch):
    w, publish = worker
    assert w.policy.after_swap(w.engine, w.engine_version, w.client.manifest)  # the first weights
    assert w.policy.last_diff < 1e-4  # trainer (fsdp=8, f32 masters) vs worker (tensor=8, bf16): rounding only
    publish(_trainer_params(1), 1)
    assert w.client.update_and_wait(timeout=60)
    w._refresh_weights()
    assert w.engine_version == 2 and w.policy.last_error is None
    assert w.replay.counters[canary.CHECKED] == 2 and w.replay.counters[canary.FAILED] == 0

    # The engine silently keeps its old weights: the next version's canary must not pass.
    monkeypatch.setattr(w.engine, "update_params", lambda params: None)
    publish(_trainer_params(2), 2)
    assert w.client.update_and_wait(timeout=60)
    w._refresh_weights()
    err = w.policy.last_error
    assert isinstance(err, canary.PolicyNotLandedError) and err.version == 3 and err.max_diff > 1e-3
    assert w.replay.counters[canary.FAILED] == 1
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "PolicyNotLandedError" in r.getMessage()]
    assert logged and "version 3" in logged[0].getMessage() and "tolerance 0.001" in logged[0].getMessage()
    w.replay.heartbeat()  # what the trainer's metrics record sums over the fleet
    assert canary.fleet_metrics(w.store.kv) == {"canary/checked": 3, "canary/failed": 1,
                                                "canary/workers_failing": 1}


def test_figures_are_in_the_manifest_and_follow_the_publish_dtype():
    config = get_base_config()
    params = _trainer_params(0)
    rec = canary.figures(config.store, CFG, params)
    assert np.asarray(rec["tokens"]).shape == (2, 16) and np.asarray(rec["logprobs"]).shape == (2, 15)
    assert np.all(np.asarray(rec["logprobs"]) < 0)
    as_f32 = canary.logprobs(CFG, params, np.asarray(rec["tokens"]), "float32")
    assert 0 < np.abs(as_f32 - np.asarray(rec["logprobs"])).max()  # bf16 rounding of the weights shows
    store = ParamStore.open("memory://", config=config)
    v = store.publish(params, 0, canary=rec)
    assert store.read_manifest(v)["canary"] == rec  # digest-covered, exact floats
    config.store.canary_prompts = 0
    assert canary.figures(config.store, CFG, params) is None


def test_compare_names_version_and_tolerance():
    rec = {"logprobs": [[-1.0, -2.0]]}
    assert canary.compare(rec, np.array([[-1.0, -2.0005]], np.float32), 7, 1e-3) == pytest.approx(5e-4, rel=1e-3)
    with pytest.raises(canary.PolicyNotLandedError, match=r"version 7: canary max \|dlogp\| 0.5 > tolerance 0.001"):
        canary.compare(rec, np.array([[-1.5, -2.0]], np.float32), 7, 1e-3)
    with pytest.raises(canary.PolicyNotLandedError, match="inf"):
        canary.compare(rec, np.array([[np.nan, -2.0]], np.float32), 7, 1e-3)


@pytest.mark.parametrize("field,value", [("canary_prompts", -1), ("canary_tokens", 1), ("canary_tolerance", 0.0)])
def test_canary_config_is_validated(field, value):
    config = get_base_config()
    config.store[field] = value
    with pytest.raises(ConfigError, match=f"store.{field}"):
        store_section.validate(config.store, config)

