"""Tool-call parsing: well-formed calls in both forms, and every malformed call a typed error."""

from __future__ import annotations

import pytest

from rlax_tpu.envs import ToolCall, format_call, parse_tool_calls
from rlax_tpu.envs.tool_calls import MAX_CALLS


def test_hermes_calls_and_prose():
    turn = ('Let me compute.\n<tool_call>\n{"name": "python", "arguments": {"code": "print(1+1)"}}\n</tool_call>\n'
            'and also <tool_call>{"name": "lookup", "arguments": {"entity": "Kalo"}}</tool_call> done')
    p = parse_tool_calls(turn)
    assert p.calls == (ToolCall("python", {"code": "print(1+1)"}), ToolCall("lookup", {"entity": "Kalo"}))
    assert p.errors == () and p.text.startswith("Let me compute.") and p.text.endswith("done")
    assert p.has_calls


def test_llama3_json_calls():
    p = parse_tool_calls('{"name": "lookup", "parameters": {"entity": "Kalo"}}')
    assert p.calls == (ToolCall("lookup", {"entity": "Kalo"}),) and p.errors == ()
    p = parse_tool_calls('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}')
    assert [c.name for c in p.calls] == ["a", "b"] and p.calls[1].arguments == {"x": 1}
    fenced = parse_tool_calls('```json\n{"name": "a", "parameters": {"y": [1, 2]}}\n```')
    assert fenced.calls == (ToolCall("a", {"y": [1, 2]}),)


def test_string_arguments_are_decoded():
    p = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>')
    assert p.calls == (ToolCall("f", {"x": 2}),)


def test_plain_answers_have_no_calls():
    for text in ("The answer is 42.\n#### 42", "{x | x > 0} is the set", "", "   "):
        p = parse_tool_calls(text)
        assert not p.has_calls, text
        assert p.text == text.strip()


@pytest.mark.parametrize("turn, needle", [
    ('<tool_call>{"name": "python", "arguments": {"code": "x"}</tool_call>', "not valid JSON"),
    ('<tool_call>{"name": "python", "arguments": {"code": "x"}}', "was not closed"),
    ('<tool_call>["python"]</tool_call>', "must be a JSON object"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'needs a "name"'),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "f", "arguments": "{oops"}</tool_call>', "not JSON"),
    ('<tool_call>{"name": "f", "args": {}}</tool_call>', "unexpected keys"),
    ('oops </tool_call>', "without an opening"),
    ('{"name": "lookup", "parameters": {"entity": "Kalo"', "not valid JSON"),
    ('<|python_tag|>print(1)', "must be followed by a JSON tool call"),
])
def test_malformed_calls_are_typed_errors(turn, needle):
    p = parse_tool_calls(turn)
    assert p.has_calls and p.calls == ()
    assert len(p.errors) >= 1 and needle in p.errors[0].message, p.errors


def test_one_bad_call_does_not_hide_the_good_ones():
    turn = ('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{bad}</tool_call>'
            '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    p = parse_tool_calls(turn)
    assert [c.name for c in p.calls] == ["a", "b"] and len(p.errors) == 1


def test_too_many_calls_are_refused_past_the_cap():
    turn = "".join(format_call(ToolCall("f", {"i": i})) for i in range(MAX_CALLS + 2))
    p = parse_tool_calls(turn)
    assert len(p.calls) == MAX_CALLS and len(p.errors) == 2


def test_format_call_round_trips():
    call = ToolCall("python", {"code": "print('<tool_call>')"})
    assert parse_tool_calls(format_call(call)).calls == (call,)
    assert parse_tool_calls(format_call(call, "llama3"), style="llama3").calls == (call,)


def test_garbage_never_raises():
    for turn in ("<tool_call>" * 50, "</tool_call>" * 3 + "{", '{"name": 1}', "{" * 1000, None, "\x00<tool_call>\x00"):
        parse_tool_calls(turn)  # type: ignore[arg-type]
