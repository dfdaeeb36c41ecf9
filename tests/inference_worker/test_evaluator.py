"""The evaluator role: which published steps it evaluates, its records, and the versions the
trainer keeps for it; a trainer with evaluation on runs to the end with no evaluator at all."""

from __future__ import annotations

import json
import os

import pytest
from flax import nnx

from inference_worker.evaluator import Evaluator, evaluate
from inference_worker.rollout import Rollouts
from param_server import ParamStore
from rlax_tpu import models, run_meta, store_layout
from rlax_tpu import tasks as tasks_lib
from rlax_tpu import tokenizer as tokenizer_lib
from rlax_tpu.config import load_config
from rlax_tpu.config.sections import eval as eval_section
from rlax_tpu.kvstore import KVStore
from tests.helpers import trainer_procs as tp


def _config(**overrides):
    base = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1,
            "task.num_eval": 6, "eval.num_samples": 4, "eval.ks": (1, 2, 4), "eval.every": 2,
            "trainer.steps": 4, "inference.max_new_tokens": 8, "inference.max_batch": 8}
    return load_config("configs/arith_grpo.py:smoke", {**base, **overrides})


def _meta(config, workdir):
    """The run metadata the trainer writes: (store, model config, tokenizer, task)."""
    task = tasks_lib.get_task(config.task)
    tok = tokenizer_lib.build(config, workdir, corpus=task.corpus())
    kv = KVStore.open(config.store.url, workdir)
    model_cfg = models.config_from_section(config.model, tok.vocab_size)
    run_meta.write_model_config(kv, model_cfg)
    run_meta.write_tokenizer(kv, tok)
    return ParamStore.open(kv, config=config), model_cfg, tok, task


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run's store as the trainer leaves it: metadata and versions of steps 0..4."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = _config()
    store, model_cfg, tok, task = _meta(config, workdir)
    weights = {}
    for step in range(5):
        params = nnx.state(models.init(model_cfg, seed=step))
        due = eval_section.due(config, step)
        keep = {"keep_for": store_layout.eval_keep_reader(step), "keep_s": 60.0} if due else {}
        store.publish(params, step, **keep)
        weights[step] = params
    return workdir, config, store, weights, tok, task


def test_due_steps_are_evaluated_once_with_the_same_record_as_the_function(run):
    workdir, config, store, weights, tok, task = run
    assert [eval_section.due(config, s) for s in range(5)] == [True, False, True, False, True]
    ev = Evaluator(config, workdir)
    assert [s for s, _, _ in ev.pending()] == [0, 2, 4]
    pins = {k.split("~")[-1] for k in store.pins()}
    assert {"step_0", "step_2", "step_4"} <= pins
    store.gc(keep=1)  # the janitor: the versions kept for the evaluator survive
    assert [s for s, _, _ in ev.pending()] == [0, 2, 4]
    assert ev.follow() == 3  # exits after the last step
    assert ev.pending() == []
    assert not any("step_" in k for k in store.pins())  # each released once evaluated
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert json.loads(store.kv.get(store_layout.eval_record_key(2))) == records[1]
    # The record is what evaluate() gives for the same weights and seed, on a fresh engine.
    engine = ev.run.engine(config, nnx.to_pure_dict(weights[2]))
    want = evaluate(Rollouts(config, engine, tok, task), task.eval_problems(config.task.num_eval, config.seed),
                    num_samples=4, ks=(1, 2, 4), temperature=config.eval.temperature,
                    max_new_tokens=config.inference.max_new_tokens, seed=config.seed + eval_section.SEED_OFFSET)
    for k in ("pass@1", "pass@2", "pass@4", "mean_reward", "generated_tokens", "num_problems"):
        assert records[1][k] == want[k], k
    assert 0.0 <= records[1]["pass@1"] <= records[1]["pass@4"] <= 1.0


def test_a_new_trainer_epoch_of_a_step_is_evaluated_again(run):
    workdir, config, store, weights, _, _ = run
    ev = Evaluator(config, workdir)
    ev.follow()
    assert ev.pending() == []
    before = json.loads(store.kv.get(store_layout.eval_record_key(4)))
    store.acquire_epoch(role="test")  # a restarted trainer republishes step 4
    store.publish(weights[3], 4, keep_for=store_layout.eval_keep_reader(4), keep_s=60.0)
    (step, version, epoch), = ev.pending()
    assert step == 4 and epoch > before["epoch"]
    assert ev.follow() == 1
    after = json.loads(store.kv.get(store_layout.eval_record_key(4)))
    assert after["epoch"] == epoch and after["version"] == version


def test_finishing_evaluator_stops_when_nothing_published_is_left(tmp_path):
    config = _config(**{"trainer.steps": 100})
    workdir = str(tmp_path)
    store, model_cfg, _, _ = _meta(config, workdir)
    store.publish(nnx.state(models.init(model_cfg, 0)), 0)
    ev = Evaluator(config, workdir)
    ev.finishing = True  # what SIGUSR1 sets: the trainer stopped before step 100
    assert ev.follow() == 1


@pytest.mark.slow
def test_the_trainer_never_waits_for_evaluation(tmp_path):
    """Evaluation on, no evaluator running: the trainer finishes every step, and the versions due
    for evaluation are still there for an evaluator started afterwards."""
    workdir = str(tmp_path)
    args = [a for a in tp.TINY if not a.startswith("--config.eval.num_samples")] + [
        "--config.eval.num_samples=2", "--config.eval.ks=(1, 2)", "--config.task.num_eval=4",
        "--config.eval.every=2", "--config.store.gc_keep=1", "--config.store.janitor_interval_s=1"]
    janitor = tp.start("param_server.main", workdir, [*args, "--mode=janitor"], log="janitor.log")
    worker = tp.start_worker(workdir, args)
    trainer = tp.start_trainer(workdir, args)
    try:
        assert tp.wait(trainer, 300, workdir, "trainer.log") == 0, tp.tail(workdir, "trainer.log")
        tp.wait_for(lambda: "gc" in tp.tail(workdir, "janitor.log"), 60, "a janitor pass", [janitor])
    finally:
        for p in (worker, janitor):
            tp.stop(p)
    assert sorted(tp.batches(workdir)) == [0, 1, 2, 3]
    ev = tp.start("inference_worker.evaluator", workdir, args, log="evaluator.log")
    assert tp.wait(ev, 300, workdir, "evaluator.log") == 0, tp.tail(workdir, "evaluator.log")
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [0, 2, 4]


CHAT = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>[assistant] {% endif %}")


def _hf_checkpoint(directory: str) -> str:
    """A tiny Llama checkpoint with its own byte-level BPE tokenizer and chat template (the
    config below trains a sentencepiece tokenizer instead: the two differ)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    from tests.helpers.hf_models import make_hf_model

    tok = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Compute: 3+4", "Compute: 5*2-1", "[user] [assistant] the answer is 7"], trainer)
    make_hf_model("llama_tied", seed=3, vocab_size=tok.get_vocab_size()).save_pretrained(directory)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT}, f)
    return directory


def test_one_shot_checkpoint_uses_the_checkpoints_own_tokenizer_and_chat_template(tmp_path):
    from tokenizers import Tokenizer

    from inference_worker.evaluator import checkpoint_tokenizer, evaluate_checkpoint

    ckpt = _hf_checkpoint(str(tmp_path / "ckpt"))
    config = _config(**{"task.num_eval": 3, "eval.num_samples": 2, "eval.ks": (1, 2)})
    assert config.tokenizer.kind == "train"  # the config's own tokenizer is another one
    tok = checkpoint_tokenizer(config, ckpt, str(tmp_path / "cache"))
    peer = Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    assert tok.vocab_size == peer.get_vocab_size() and tok.eos_id == peer.token_to_id("</s>")
    prompt = "Compute: 3+4"
    rendered = f"<s>[user] {prompt}</s><s>[assistant] "  # the checkpoint's chat template
    assert tok.encode_prompt(prompt) == peer.encode(rendered).ids
    report = evaluate_checkpoint(config, ckpt, str(tmp_path / "work"))
    assert report["num_problems"] == 3 and report["generated_tokens"] > 0 and 0.0 <= report["pass@1"] <= 1.0


def test_one_shot_gguf_checkpoint_reads_the_tokenizer_inside_the_file(tmp_path):
    from inference_worker.evaluator import checkpoint_tokenizer
    from tests.helpers.checkpoints import smollm2_or_skip

    gguf = smollm2_or_skip()
    tok = checkpoint_tokenizer(_config(), gguf, str(tmp_path))
    assert tok.vocab_size == 49152 and tok.decode(tok.encode("Compute: 7-3")) == "Compute: 7-3"
    rendered = tok.decode(tok.encode_prompt("hi"), skip_special=False)  # SmolLM2's own chat template
    assert "<|im_start|>user\nhi<|im_end|>" in rendered and rendered.endswith("<|im_start|>assistant\n")
