"""Store keys shared by the trainer and the evaluator role.

    evals/step_<S:012d>                 the eval record of trainer step S (JSON), written by the evaluator
    params/pins/evaluator~step_<S>      pins step S's version against gc until it is evaluated
"""

from __future__ import annotations

RECORDS = "evals/"
READER = "evaluator"


def record_key(step: int) -> str:
    return f"{RECORDS}step_{int(step):012d}"


def keep_reader(step: int) -> str:
    """The pin (reader name) under which the trainer keeps step ``step``'s version for the evaluator."""
    return f"{READER}/step_{int(step)}"
