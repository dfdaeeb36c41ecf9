"""Tool calls in a model's turn: the Hermes/Qwen tag form and Llama 3's bare JSON.

    <tool_call>{"name": "python", "arguments": {"code": "print(2**10)"}}</tool_call>   (Hermes, Qwen)
    {"name": "python", "parameters": {"code": "print(2**10)"}}                         (Llama 3)

parse_tool_calls() never raises: each malformed call becomes a ToolCallError whose message is
written for the model (it is sent back as the tool's answer), so a bad call costs a turn and a
metric, never a crash or a silently ended episode.
"""

from __future__ import annotations

import dataclasses
import json
import re

STYLES = ("auto", "hermes", "llama3")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)
MAX_CALLS = 8  # calls past this many in one turn are answered with an error, not run


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclasses.dataclass(frozen=True)
class ToolCallError:
    """A call that could not be read; message is shown to the model."""

    message: str
    raw: str


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """A model turn split into its prose (calls removed), its calls and its malformed calls."""

    text: str
    calls: tuple[ToolCall, ...]
    errors: tuple[ToolCallError, ...]

    @property
    def has_calls(self) -> bool:
        return bool(self.calls or self.errors)


def _snippet(raw: str, n: int = 120) -> str:
    raw = raw.strip()
    return raw if len(raw) <= n else raw[:n] + "..."


def _to_call(obj, raw: str, args_key: str) -> ToolCall | ToolCallError:
    """A decoded JSON value as a call, or the error explaining what is wrong with it."""
    want = f'{{"name": "<tool name>", "{args_key}": {{...}}}}'
    if not isinstance(obj, dict):
        return ToolCallError(f"a tool call must be a JSON object {want}, got {type(obj).__name__}", raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError(f'a tool call needs a "name" string: {want}', raw)
    keys = [k for k in ("arguments", "parameters") if k in obj]
    args = obj[keys[0]] if keys else {}
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCallError(f'"{keys[0]}" of {name} is a string that is not JSON: {e.msg}', raw)
    if not isinstance(args, dict):
        return ToolCallError(f'"{keys[0] if keys else args_key}" of {name} must be a JSON object', raw)
    extra = sorted(set(obj) - {"name", "arguments", "parameters", "id", "type"})
    if extra:
        return ToolCallError(f"unexpected keys {extra} in the call of {name}: {want}", raw)
    return ToolCall(name, args)


def _decode(body: str, args_key: str) -> ToolCall | ToolCallError:
    m = _FENCE.match(body.strip())
    text = m.group(1) if m else body
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return ToolCallError(f"the tool call is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                             f"{_snippet(text)}", body)
    return _to_call(obj, body, args_key)


def _parse_hermes(text: str) -> ParsedTurn:
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    prose: list[str] = []
    pos = 0
    while True:
        start = text.find(_OPEN, pos)
        if start < 0:
            prose.append(text[pos:])
            break
        prose.append(text[pos:start])
        end = text.find(_CLOSE, start + len(_OPEN))
        nxt = text.find(_OPEN, start + len(_OPEN))
        if end < 0 or (0 <= nxt < end):
            stop = nxt if nxt >= 0 else len(text)
            errors.append(ToolCallError(f"{_OPEN} was not closed with {_CLOSE}", text[start:stop]))
            pos = stop
            continue
        out = _decode(text[start + len(_OPEN):end], "arguments")
        (calls if isinstance(out, ToolCall) else errors).append(out)
        pos = end + len(_CLOSE)
    stray = "".join(prose)
    if _CLOSE in stray:
        errors.append(ToolCallError(f"{_CLOSE} without an opening {_OPEN}", _snippet(stray)))
        stray = stray.replace(_CLOSE, "")
    return ParsedTurn(stray.strip(), tuple(calls), tuple(errors))


def _parse_llama3(text: str) -> ParsedTurn:
    body = text.strip()
    tagged = body.startswith(_PYTHON_TAG)
    if tagged:
        body = body[len(_PYTHON_TAG):].strip()
    m = _FENCE.match(body)
    if m:
        body = m.group(1).strip()
    if not body.startswith("{"):
        if tagged:
            return ParsedTurn("", (), (ToolCallError(f"{_PYTHON_TAG} must be followed by a JSON tool call",
                                                     _snippet(body)),))
        return ParsedTurn(text.strip(), (), ())
    # one call, or several separated by ';' or whitespace
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    pos = 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError as e:
            if not calls and '"name"' not in body:
                return ParsedTurn(text.strip(), (), ())  # prose that happens to start with '{'
            errors.append(ToolCallError(f"the tool call is not valid JSON ({e.msg} at column {e.colno}): "
                                        f"{_snippet(body[pos:])}", body[pos:]))
            break
        out = _to_call(obj, body[pos:end], "parameters")
        if isinstance(out, ToolCallError) and not calls and not isinstance(obj, dict):
            return ParsedTurn(text.strip(), (), ())
        (calls if isinstance(out, ToolCall) else errors).append(out)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return ParsedTurn("", tuple(calls), tuple(errors))


def parse_tool_calls(text: str, style: str = "auto") -> ParsedTurn:
    """The calls in a model turn. style 'hermes' reads <tool_call> tags, 'llama3' a turn that
    is a JSON call (after an optional <|python_tag|>), 'auto' tags if any, else Llama 3 JSON."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if not isinstance(text, str):
        return ParsedTurn("", (), (ToolCallError(f"the turn is not text ({type(text).__name__})", ""),))
    if style == "hermes" or (style == "auto" and (_OPEN in text or _CLOSE in text)):
        parsed = _parse_hermes(text)
    else:
        parsed = _parse_llama3(text)
    if len(parsed.calls) > MAX_CALLS:
        extra = parsed.calls[MAX_CALLS:]
        parsed = ParsedTurn(parsed.text, parsed.calls[:MAX_CALLS], parsed.errors + tuple(
            ToolCallError(f"at most {MAX_CALLS} tool calls per turn; {c.name} was not run", c.name) for c in extra))
    return parsed


def format_call(call: ToolCall, style: str = "hermes") -> str:
    """A call written the way parse_tool_calls reads it (for SFT traces and scripted turns)."""
    if style == "llama3":
        return json.dumps({"name": call.name, "parameters": call.arguments})
    # '<' escaped so that a tag inside an argument string cannot end the call early
    body = json.dumps({"name": call.name, "arguments": call.arguments}).replace("<", "\\u003c")
    return f"{_OPEN}\n{body}\n{_CLOSE}"
