"""Tasks: registry, determinism, held-out disjointness, JSONL datasets, reward safety, grain
resume, pass@k, config validation."""

import json
import math

import pytest

from rlax_tpu import tasks
from rlax_tpu.config import get_base_config
from rlax_tpu.config.errors import ConfigError
from rlax_tpu.config.validate import validate
from rlax_tpu.tasks import Problem, Reward, pass_at_k, safe_reward
from rlax_tpu.tasks.metrics import mean_pass_at_k


def _cfg(name="arith", **overrides):
    c = get_base_config()
    c.task.name = name
    for k, v in overrides.items():
        c.task[k] = v
    return c


def _task(name="arith", **overrides):
    return tasks.get_task(_cfg(name, **overrides).task)


# --- registry and config --------------------------------------------------------------------

def test_unknown_task_names_the_field():
    c = _cfg()
    c.task.name = "nope"
    with pytest.raises(ConfigError, match=r"config\.task\.name.*nope"):
        tasks.get_task(c.task)
    with pytest.raises(ConfigError, match=r"config\.task\.name"):
        validate(c)


@pytest.mark.parametrize("field, value", [
    ("min_difficulty", 5), ("eval_fraction", 1.5), ("verifier", "fuzzy"), ("answer_format", "xml"),
    ("reward_timeout_s", 0.0), ("format_weight", -1.0), ("operators", "+/"), ("operators", ""),
    ("operators", "++"),
])
def test_config_validation_names_field(field, value):
    c = _cfg(**{field: value})
    with pytest.raises(ConfigError, match=rf"config\.task\.{field}"):
        validate(c)


def test_default_config_is_valid():
    validate(_cfg())


# --- generation -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["arith", "countdown", "compose"])
def test_determinism_and_disjointness(name):
    task = _task(name)
    a = task.train_problems(300, seed=3)
    assert a == _task(name).train_problems(300, seed=3)           # same seed, fresh object
    assert a != task.train_problems(300, seed=4)
    ev = task.eval_problems(60, seed=0)
    assert ev == task.eval_problems(60, seed=0)
    assert len({p.prompt for p in ev}) == 60                       # distinct
    train_prompts = {p.prompt for s in range(3) for p in task.train_problems(300, seed=s)}
    assert not train_prompts & {p.prompt for s in range(3) for p in task.eval_problems(60, seed=s)}
    for p in a[:20] + ev[:20]:
        assert Problem.from_dict(json.loads(json.dumps(p.to_dict()))) == p   # plain data
        assert p.prompt_id.startswith(name + "-")
        assert 1 <= p.meta["difficulty"] <= 3


def test_difficulty_ranges_for_extrapolation():
    task = _task("compose", min_difficulty=1, difficulty=2, eval_min_difficulty=3, eval_difficulty=4)
    assert {p.meta["difficulty"] for p in task.train_problems(200, 0)} == {1, 2}
    assert {p.meta["difficulty"] for p in task.eval_problems(100, 0)} == {3, 4}
    assert all(len(p.meta["ops"]) == p.meta["difficulty"] for p in task.eval_problems(20, 0))


def test_arith_mix_is_small_and_varied():
    task = _task("arith")
    probs = task.train_problems(500, seed=0)
    assert {p.meta["difficulty"] for p in probs} == {1, 2, 3}
    assert all(len(p.prompt) < 40 and len(p.answer) <= 4 for p in probs)
    assert len({p.answer for p in probs}) > 50


def test_arith_operators_subset():
    probs = _task("arith", operators="+-", difficulty=3).train_problems(300, seed=0)
    assert {op for p in probs for op in p.meta["ops"]} == {"+", "-"}
    assert all("*" not in p.prompt for p in probs)


def test_too_few_distinct_eval_problems_is_a_clear_error():
    task = _task("arith", difficulty=1, max_number=3)   # 27 possible problems in all
    with pytest.raises(ConfigError, match=r"config\.task\.num_eval: only [1-9] distinct"):
        task.eval_problems(50, seed=0)
    task = _task("arith", difficulty=1, max_number=1, eval_fraction=0.01)   # 3 problems
    with pytest.raises(ConfigError, match=r"config\.task\.eval_fraction"):
        task.eval_problems(1, seed=0)


def test_corpus_has_prompts_and_solutions():
    task = _task("arith", num_train=50, num_eval=10)
    texts = list(task.corpus())
    assert len(texts) == 120 and any("####" in t for t in texts)


# --- JSONL datasets ---------------------------------------------------------------------------

def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_task(tmp_path):
    rows = [json.dumps({"q": f"What is {i}+{i}?", "a": str(2 * i), "source": "t"}) for i in range(200)]
    path = _write(tmp_path / "d.jsonl", rows[:100] + [""] + rows[100:])
    task = _task("jsonl", path=path, prompt_field="q", answer_field="a", eval_fraction=0.2, num_train=10)
    train, ev = task.train_problems(1000, 0), task.eval_problems(1000, 0)
    assert len(train) + len(ev) == 200 and 10 < len(ev) < 70
    assert not {p.prompt for p in train} & {p.prompt for p in ev}
    assert task.train_problems(1000, 0) == train and task.train_problems(1000, 1) != train
    p = train[0]
    assert p.meta["source"] == "t"
    assert task.reward(p, f"so \\boxed{{{p.answer}}}").correct
    assert task.reward(p, task.solution_text(p)).correct
    assert not task.reward(p, "#### -1").correct
    assert len(tasks.prompt_dataset(task, "train", 0, repeat=False)) == len(train)   # whole split
    assert len(tasks.prompt_dataset(task, "eval", 0, num=5)) == 5
    # a separate eval file; prompts also in the train file are dropped from eval
    ev_path = _write(tmp_path / "e.jsonl", [json.dumps({"q": "new?", "a": "1"}), rows[0]])
    task2 = _task("jsonl", path=path, eval_path=ev_path, prompt_field="q", answer_field="a")
    assert [p.prompt for p in task2.eval_problems(10, 0)] == ["new?\n" + tasks.jsonl.HASH_INSTRUCTION]


def test_jsonl_format_reward_and_styles(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": f"p{i}", "answer": 7}) for i in range(30)])
    task = _task("jsonl", path=path, answer_format="boxed", format_weight=0.2, correct_weight=0.8)
    p = task.train_problems(1, 0)[0]
    assert task.reward(p, r"\boxed{7}").score == pytest.approx(1.0)
    assert task.reward(p, r"\boxed{8}").score == pytest.approx(0.2)
    assert task.reward(p, "#### 7").score == 0.0                  # wrong format for 'boxed'


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "b"}'], r"d\.jsonl:2: missing field 'answer'"),
    (['{"prompt": "a", "answer": "1"}', "", '{"prompt": "b", "answer": '], r"d\.jsonl:3: invalid JSON"),
    (['["prompt", "answer"]'], r"d\.jsonl:1: expected a JSON object"),
    (['{"prompt": "", "answer": "1"}'], r"d\.jsonl:1: field 'prompt' must be a non-empty string"),
    (['{"prompt": "a", "answer": null}'], r"d\.jsonl:1: field 'answer' must be"),
])
def test_jsonl_bad_lines(tmp_path, lines, message):
    path = _write(tmp_path / "d.jsonl", lines)
    with pytest.raises(tasks.DatasetError, match=message):
        _task("jsonl", path=path)


def test_jsonl_missing_file_and_duplicate_ids(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.task\.path.*nowhere\.jsonl"):
        _task("jsonl", path=str(tmp_path / "nowhere.jsonl"))
    path = _write(tmp_path / "d.jsonl", ['{"id": 1, "prompt": "a", "answer": "1"}',
                                         '{"id": 1, "prompt": "b", "answer": "2"}'])
    with pytest.raises(tasks.DatasetError, match=r"d\.jsonl:2: duplicate 'id' '1' \(first on line 1\)"):
        _task("jsonl", path=path, id_field="id")


# --- reward safety ----------------------------------------------------------------------------

def test_safe_reward_catches_everything():
    p = Problem("x", "q", "1")

    def boom(problem, completion):
        raise RuntimeError("verifier bug")

    r = safe_reward(boom, p, "anything")
    assert r.score == 0.0 and r.details["reason"] == "error" and "verifier bug" in r.details["error"]
    r = safe_reward(lambda pr, c: Reward(float("nan"), {}), p, "x")
    assert r.score == 0.0 and r.details["reason"] == "bad_score"
    r = safe_reward(lambda pr, c: Reward(1.0, {"correct": True}), p, None)  # not a string
    assert r.score == 0.0 and r.details["reason"] == "error"
    seen = []
    safe_reward(lambda pr, c: seen.append(len(c)) or Reward(0.0, {}), p, "x" * 10**6)
    assert seen == [tasks.base.MAX_COMPLETION_CHARS]            # huge completions are cut


def test_task_reward_timeout_and_bad_problem():
    task = _task("countdown", reward_timeout_s=1e-9)
    p = Problem("x", "Make 13 from 2 3 5", "5*2+3", {"numbers": [2, 3, 5], "target": 13})
    r = task.reward(p, "#### 5*2+3")
    assert r.score == 0.0 and r.details["reason"] == "timeout"
    r = _task("countdown").reward(Problem("x", "q", "1", {}), "#### 1+2")   # meta lacks numbers
    assert r.score == 0.0 and r.details["reason"] == "error"
    assert _task("arith").reward(p.to_dict(), "#### 5").details["reason"] == "error"  # dict input ok


# --- grain prompt datasets ----------------------------------------------------------------------

def test_prompt_dataset_resumes_exactly():
    task = _task("arith", num_train=37)
    ds = tasks.prompt_dataset(task, "train", seed=5)
    src_repr = repr(tasks.PromptSource(task, "train", 5))
    assert src_repr == repr(tasks.PromptSource(_task("arith", num_train=37), "train", 5))
    assert src_repr.startswith("PromptSource(task='arith', split='train', seed=5, len=37, config=")
    it = iter(ds.to_iter_dataset())
    head = [next(it) for _ in range(50)]                         # past one epoch (37)
    state = it.get_state()
    tail = [next(it) for _ in range(30)]
    it2 = iter(tasks.prompt_dataset(_task("arith", num_train=37), "train", seed=5).to_iter_dataset())
    it2.set_state(json.loads(json.dumps(state)))
    assert [next(it2) for _ in range(30)] == tail
    assert isinstance(head[0], dict) and set(head[0]) == {"prompt_id", "prompt", "answer", "meta"}
    epoch1 = [d["prompt_id"] for d in head[:37]]
    assert sorted(epoch1) == sorted(p.prompt_id for p in task.train_problems(37, 5))
    assert epoch1 != [d["prompt_id"] for d in (head + tail)[37:74]]   # reshuffled per epoch


def test_prompt_dataset_eval_and_repr():
    task = _task("countdown", num_eval=16)
    ds = tasks.prompt_dataset(task, "eval", seed=0)
    assert len(ds) == 16
    assert [ds[i]["prompt_id"] for i in range(16)] == [p.prompt_id for p in task.eval_problems(16, 0)]
    src = tasks.PromptSource(task, "eval", 0)
    assert "countdown" in repr(src) and "'eval'" in repr(src)
    assert repr(src) != repr(tasks.PromptSource(_task("countdown", num_eval=16, difficulty=2), "eval", 0))
    with pytest.raises(IndexError):
        src[16]


# --- pass@k -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, c, k, expected", [
    (10, 0, 1, 0.0), (10, 10, 5, 1.0), (10, 3, 1, 0.3),
    (5, 2, 2, 1 - 3 / 10),             # 1 - C(3,2)/C(5,2)
    (10, 1, 5, 0.5),                   # 1 - C(9,5)/C(10,5) = 1 - 126/252
    (4, 1, 4, 1.0), (4, 3, 2, 1.0),    # n - c < k
    (8, 2, 3, 1 - 20 / 56),            # 1 - C(6,3)/C(8,3)
])
def test_pass_at_k_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_comb_and_errors():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert mean_pass_at_k([(10, 3), (10, 0)], 1) == pytest.approx(0.15)
    for bad in [(0, 0, 1), (5, 6, 1), (5, 2, 6), (5, 2, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_dataloader_resume_and_repr_check():
    import grain

    def loader(**overrides):
        src = tasks.PromptSource(_task("arith", num_train=20, **overrides), "train", 0)
        sampler = grain.samplers.IndexSampler(len(src), shuffle=True, seed=1, num_epochs=None)
        return iter(grain.DataLoader(data_source=src, sampler=sampler, worker_count=0))

    it = loader()
    [next(it) for _ in range(25)]
    state = it.get_state()
    tail = [next(it)["prompt_id"] for _ in range(5)]
    it2 = loader()
    it2.set_state(state)
    assert [next(it2)["prompt_id"] for _ in range(5)] == tail
    with pytest.raises(ValueError, match="does not match"):
        loader(difficulty=2).set_state(state)        # other data: the stable repr differs
