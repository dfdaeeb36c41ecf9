"""Math datasets: GSM8K and AIME 2025 as packaged, user JSONL in its three formats, prompt
instructions, SFT solutions, grain resume."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from rlax_tpu import tasks
from rlax_tpu.config import get_base_config
from rlax_tpu.config.errors import ConfigError
from rlax_tpu.config.validate import validate
from rlax_tpu.tasks import math_answer
from rlax_tpu.tasks.jsonl import BOXED_INSTRUCTION, HASH_INSTRUCTION
from rlax_tpu.tasks.jsonl_data import load_gsm8k

GSM8K_SIZE = 1319


def _cfg(name, **overrides):
    c = get_base_config()
    c.task.name = name
    for k, v in overrides.items():
        c.task[k] = v
    return c


def _task(name, **overrides):
    return tasks.get_task(_cfg(name, **overrides).task)


@pytest.fixture(scope="module")
def gsm8k():
    math_answer.math_pool(2)  # the process-wide pool, started once for the module's rewards
    return _task("gsm8k", eval_fraction=0.2)


def _split_digest(task) -> str:
    ids = sorted(p.prompt_id for p in task.split("eval"))
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def test_gsm8k_split(gsm8k):
    train, held_out = gsm8k.split("train"), gsm8k.split("eval")
    assert len(train) + len(held_out) == GSM8K_SIZE
    assert 0.15 * GSM8K_SIZE < len(held_out) < 0.25 * GSM8K_SIZE
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in held_out}
    assert len({p.prompt_id for p in train + held_out}) == GSM8K_SIZE
    # the same split in a fresh interpreter (no salted hash anywhere)
    code = ("import hashlib, json; from rlax_tpu.config import get_base_config; from rlax_tpu import tasks\n"
            "c = get_base_config(); c.task.name = 'gsm8k'; c.task.eval_fraction = 0.2\n"
            "ids = sorted(p.prompt_id for p in tasks.get_task(c.task).split('eval'))\n"
            "print(hashlib.sha256(json.dumps(ids).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == _split_digest(gsm8k)
    # a different fraction moves problems only one way: held-out at 0.1 is a subset of 0.2
    small = {p.prompt_id for p in _task("gsm8k", eval_fraction=0.1).split("eval")}
    assert small < {p.prompt_id for p in held_out}


def test_gsm8k_problems_and_references(gsm8k):
    examples, _ = load_gsm8k()
    assert len(examples) == GSM8K_SIZE
    p = next(p for p in gsm8k.split("train") + gsm8k.split("eval") if p.prompt.startswith("Janet"))
    assert p.answer == "18" and p.prompt.endswith("\n" + HASH_INSTRUCTION)
    sol = gsm8k.solution_text(p)
    assert "<<" not in sol and ">>" not in sol and sol.endswith("#### 18")
    assert "16 - 3 - 4 = 9 duck eggs" in sol
    from math_verify import parse

    for ex in examples:  # every reference is a plain number (commas removed) that math-verify reads
        assert ex.answer.lstrip("-").replace(".", "", 1).isdigit(), ex
        assert parse("\\boxed{" + ex.answer + "}", parsing_timeout=None), ex
    assert any("," in ex.solution.rsplit("####", 1)[1] for ex in examples)   # '#### 1,234' still verifies


def test_gsm8k_worked_answers_score_one_wrong_ones_zero(gsm8k):
    problems = gsm8k.split("train") + gsm8k.split("eval")
    right = gsm8k.rewards(problems, [gsm8k.solution_text(p) for p in problems])
    bad = [r for p, r in zip(problems, right, strict=True) if r.score != 1.0]
    assert not bad, bad[:3]
    sample = problems[::20]
    wrong = [gsm8k.solution_text(p).rsplit("####", 1)[0] + f"#### {int(float(p.answer)) + 1}" for p in sample]
    assert all(r.score == 0.0 and r.details["reason"] == "wrong" for r in gsm8k.rewards(sample, wrong))


def test_gsm8k_boxed_format_and_instructions():
    task = _task("gsm8k", answer_format="boxed", format_weight=0.5)
    p = task.train_problems(1, 0)[0]
    assert p.prompt.endswith("\n" + BOXED_INSTRUCTION)
    sol = task.solution_text(p)
    assert "####" not in sol and sol.endswith(f"\\boxed{{{p.answer}}}.")
    assert task.reward(p, sol).score == 1.5
    assert task.reward(p, f"#### {p.answer}").score == 0.0        # the wrong format for 'boxed'
    custom = _task("gsm8k", instruction="Answer briefly.")
    assert custom.train_problems(1, 0)[0].prompt.endswith("\nAnswer briefly.")
    bare = _task("gsm8k", instruction="")
    q = bare.train_problems(1, 0)[0]
    assert "####" not in q.prompt and q.prompt_id == custom.train_problems(1, 0)[0].prompt_id


def test_aime2025_eval_set():
    task = _task("gsm8k", eval_set="aime2025", answer_format="boxed", num_eval=100)
    held_out = task.eval_problems(100, 0)
    assert len(held_out) == 30 and len(task.split("train")) == GSM8K_SIZE
    assert all(re.fullmatch(r"\d{1,3}(\^\\circ)?", p.answer) for p in held_out)   # one is 336^\circ
    assert {p.meta["source"] for p in held_out} == {"aime2025-I", "aime2025-II"}
    assert all(p.prompt.endswith(BOXED_INSTRUCTION) for p in held_out)
    integers = [p.answer.split("^")[0] for p in held_out]
    completions = [f"so \\boxed{{{a}}}" for a in integers] + [f"\\boxed{{{int(a) + 1}}}" for a in integers]
    rs = task.rewards(held_out * 2, completions)
    assert [r.correct for r in rs] == [True] * 30 + [False] * 30


def test_gsm8k_prompt_dataset_resumes():
    task = _task("gsm8k")
    ds = tasks.prompt_dataset(task, "train", seed=3)
    it = iter(ds.to_iter_dataset())
    [next(it) for _ in range(7)]
    state = it.get_state()
    tail = [next(it)["prompt_id"] for _ in range(5)]
    it2 = iter(tasks.prompt_dataset(_task("gsm8k"), "train", seed=3).to_iter_dataset())
    it2.set_state(json.loads(json.dumps(state)))
    assert [next(it2)["prompt_id"] for _ in range(5)] == tail
    assert repr(tasks.PromptSource(task, "train", 3)).startswith("PromptSource(task='gsm8k', split='train'")
    assert len(tasks.prompt_dataset(task, "eval", 0)) == min(256, len(task.split("eval")))


# --- user JSONL in three formats ----------------------------------------------------------------

def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


FORMS = {
    "prompt_answer": lambda i: {"prompt": f"What is {i}+{i}?", "answer": 2 * i},
    "gsm8k": lambda i: {"question": f"Tom has {i} apples and buys {i} more. How many?",
                        "answer": f"He has {i}+{i} = <<{i}+{i}={2 * i}>>{2 * i} apples.\n#### {2 * i:,}"},
    "math": lambda i: {"problem": f"Compute ${i}+{i}$.", "solution": f"We add: ${i}+{i}=\\boxed{{{2 * i}}}$."},
}


@pytest.mark.parametrize("fmt", sorted(FORMS))
@pytest.mark.parametrize("told", [False, True])
def test_jsonl_three_formats(tmp_path, fmt, told):
    path = _write(tmp_path, "d.jsonl", [FORMS[fmt](i) for i in range(995, 1055)])
    task = _task("jsonl", path=path, format=fmt if told else "auto", eval_fraction=0.2)
    assert task.format == fmt
    problems = task.split("train") + task.split("eval")
    assert len(problems) == 60 and {p.answer for p in problems} == {str(2 * i) for i in range(995, 1055)}
    style = "boxed" if fmt == "math" else "hash"
    assert task.style == style
    assert all(p.prompt.endswith(BOXED_INSTRUCTION if style == "boxed" else HASH_INSTRUCTION) for p in problems)
    sols = [task.solution_text(p) for p in problems]
    if fmt == "gsm8k":
        assert all("<<" not in s and "apples" in s for s in sols)
    rs = task.rewards(problems, sols)
    assert all(r.correct for r in rs), [r for r in rs if not r.correct][:2]
    assert not task.reward(problems[0], "#### 7").correct


@pytest.mark.parametrize("fmt, rows, message", [
    ("gsm8k", [FORMS["gsm8k"](1), {"question": "q", "answer": "no final line"}],
     r"d\.jsonl:2: field 'answer' has no final '#### <answer>' line"),
    ("gsm8k", [FORMS["gsm8k"](1), "", {"question": "q"}], r"d\.jsonl:3: missing field 'answer' for format 'gsm8k'"),
    ("math", [FORMS["math"](1), {"problem": "p", "solution": "it is 4"}],
     r"d\.jsonl:2: field 'solution' has no \\boxed\{\.\.\.\} final answer"),
    ("math", [{"problem": 3, "solution": r"\boxed{1}"}], r"d\.jsonl:1: field 'problem' must be a non-empty string"),
    ("auto", [FORMS["math"](1), FORMS["gsm8k"](2)], r"d\.jsonl:2: missing field 'problem' for format 'math'"),
    ("auto", [{"text": "x", "label": 1}], r"d\.jsonl:1: cannot tell the format from the fields \['label', 'text'\]"),
    ("prompt_answer", [FORMS["gsm8k"](1)], r"d\.jsonl:1: missing field 'prompt' for format 'prompt_answer'"),
])
def test_jsonl_bad_lines_name_file_and_line(tmp_path, fmt, rows, message):
    path = _write(tmp_path, "d.jsonl", rows)
    with pytest.raises(tasks.DatasetError, match=message):
        _task("jsonl", path=path, format=fmt)


def test_jsonl_eval_path_in_another_format(tmp_path):
    train = _write(tmp_path, "t.jsonl", [FORMS["prompt_answer"](i) for i in range(20)])
    held = _write(tmp_path, "e.jsonl", [FORMS["math"](i) for i in range(5)])
    task = _task("jsonl", path=train, eval_path=held, answer_format="any")
    assert task.format == "prompt_answer" and len(task.split("eval")) == 5 and len(task.split("train")) == 20
    p = task.split("eval")[0]
    assert task.reward(p, task.solution_text(p)).correct


@pytest.mark.parametrize("field, value", [
    ("format", "csv"), ("eval_set", "aime2024"), ("reward_workers", 0), ("reward_workers", 65),
])
def test_config_validation_names_new_fields(field, value):
    with pytest.raises(ConfigError, match=rf"config\.task\.{field}"):
        validate(_cfg("gsm8k", **{field: value}))


def test_config_validation_cross_fields():
    validate(_cfg("gsm8k"))
    with pytest.raises(ConfigError, match=r"config\.task\.path"):
        validate(_cfg("gsm8k", path="/data/x.jsonl"))
    with pytest.raises(ConfigError, match=r"config\.task\.eval_set.*not both"):
        validate(_cfg("jsonl", path="x.jsonl", eval_path="y.jsonl", eval_set="aime2025"))
    with pytest.raises(ConfigError, match=r"config\.task\.path"):
        _task("gsm8k", path="/data/x.jsonl")
