"""SFT traces from solved tool_arith episodes in SmolLM2's own chat template: the token layout
(model tokens loss 1, environment tokens 0), the decode back to the reference conversation,
and the checks on the trace file."""

from __future__ import annotations

import json

import pytest

from rlax_tpu import envs
from rlax_tpu import tokenizer as tokenizer_lib
from rlax_tpu.config import ConfigError, get_base_config, validate
from rlax_tpu.envs import traces
from rlax_tpu.sandbox import SandboxPool
from tests.helpers.checkpoints import smollm2_or_skip
from tests.rlax_tpu.sandbox.usable import needs_bwrap
from trainer import batching


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    c = get_base_config()
    c.tokenizer.kind, c.tokenizer.path = "gguf", smollm2_or_skip()
    return tokenizer_lib.build(c, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def env(tok):
    c = get_base_config()
    c.env.name = "tool_arith"
    c.task.min_difficulty = c.task.difficulty = 1
    validate(c)
    with SandboxPool.from_config(c.sandbox) as pool:
        yield envs.make_env(c, lambda s: len(tok.encode(s)), pool)


def segments(tokens: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    """Runs of equal loss mask: [(mask, ids), ...]."""
    out: list[tuple[int, list[int]]] = []
    for t, m in zip(tokens, mask, strict=True):
        if out and out[-1][0] == m:
            out[-1][1].append(t)
        else:
            out.append((m, [t]))
    return out


@needs_bwrap
def test_tool_arith_trace_masks_the_tool_reply_and_decodes_to_the_reference_conversation(tok, env):
    problem = env.train_problems(1, seed=3)[0]
    trace = traces.reference_episode(env, problem)
    value = str(eval(problem.meta["expression"]))  # noqa: S307 - the expression the env generated
    assert trace["turns"][0]["env"] == [{"role": "tool", "content": value}]  # the tool really ran
    ep = traces.episode_tokens(tok, trace)
    tokens, mask = traces.sft_row(ep)
    end = "<|im_end|>"
    kinds = [(m, tok.decode(ids, skip_special=False)) for m, ids in segments(tokens, mask)]
    assert [m for m, _ in kinds] == [0, 1, 0, 1]
    prompt, call, reply, answer = (text for _, text in kinds)
    assert prompt.endswith(f"{problem.prompt}{end}\n<|im_start|>assistant\n")
    assert call == env.reference_turns(problem)[0] + end  # the model's turn stops at its end token
    assert reply == f"\n<|im_start|>tool\n{value}{end}\n<|im_start|>assistant\n"  # the newline is the env's
    assert answer == env.reference_turns(problem)[1] + end
    messages = trace["prompt"] + [{"role": "assistant", "content": trace["turns"][0]["model"]},
                                  *trace["turns"][0]["env"],
                                  {"role": "assistant", "content": trace["turns"][1]["model"]}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.decode(tokens, skip_special=False) + "\n" == rendered
    assert ep.mismatches() == 0 and ep.delta_fallbacks == 0
    # The trainer's row: position t is trained when token t + 1 is the model's.
    row = batching.sft_episode_batch([(tokens, mask)], len(tokens) + 4)
    assert row["mask"][0].sum() == sum(mask) == ep.num_model_tokens
    assert (row["targets"][0][row["mask"][0]] == [t for t, m in zip(tokens, mask, strict=True) if m]).all()


def test_trace_file_and_config_are_checked(tmp_path):
    c = get_base_config()
    c.sft.traces_path = str(tmp_path / "t.jsonl")
    with pytest.raises(ConfigError, match="sft.traces_path"):
        validate(c)  # episodes need an environment
    with pytest.raises(ConfigError, match="does not exist"):
        traces.read_traces(str(tmp_path / "missing.jsonl"), "tool_arith", 1)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"env": "kb_qa", "prompt": [], "turns": []}) + "\n")
    with pytest.raises(ConfigError, match="not env.name='tool_arith'"):
        traces.read_traces(str(path), "tool_arith", 1)
    with pytest.raises(ConfigError, match="has 1 traces"):
        traces.read_traces(str(path), "kb_qa", 2)
