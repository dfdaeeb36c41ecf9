"""config.env: multi-turn environments (episodes with tools) and their limits (see docs/envs.md)."""

import ml_collections

from rlax_tpu.config.sections._checks import one_of, positive

SECTION = "env"

ENV_NAMES = ("", "tool_arith", "code", "kb_qa")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Environment from the rlax_tpu.envs registry: '' = the task named by task.name as a one-step
    # environment; 'tool_arith' (3-4 digit sums and products with a Python tool), 'code'
    # (function-writing problems checked by hidden unit tests in the sandbox), 'kb_qa'
    # (multi-hop questions over a generated knowledge base, answered through lookup calls).
    # Problem counts, the held-out fraction and the difficulty range come from the task section
    # (difficulty = hops for kb_qa, operations for tool_arith).
    c.name = ""
    # Model turns per episode; the episode ends (done, unsolved) after this many.
    c.max_turns = 6
    # Tokens per episode, model and environment turns together (prompt excluded); past it the
    # episode ends unsolved with info['truncated'] = True.
    c.max_total_tokens = 4096
    # Wall-clock seconds of tool execution per episode (sum over its calls); past it tool calls
    # are answered with an error and the episode ends at the next turn.
    c.max_tool_seconds = 30.0
    # env 'code': a JSONL file of {prompt, tests} problems (tests: Python source with asserts,
    # or a list of such strings, one verdict each); '' = synthetic problems generated in-process.
    c.code_path = ""
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    one_of(SECTION, c, "name", ENV_NAMES)
    positive(SECTION, c, "max_turns")
    positive(SECTION, c, "max_total_tokens")
    positive(SECTION, c, "max_tool_seconds")
