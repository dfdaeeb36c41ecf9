"""Tools as typed Python functions: their JSON schema, argument checks, and the system prompt
that describes them (templates without `tools` handling, like SmolLM2's, need it in text)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from rlax_tpu.envs.tool_calls import ToolCall
from rlax_tpu.tokenizer.tool_schema import get_json_schema

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}


class ToolError(Exception):
    """A call the tool refuses (bad arguments); the message is shown to the model."""


def _type_ok(value: Any, schema: dict) -> bool:
    kinds = schema.get("type")
    if kinds is None:
        return True
    kinds = [kinds] if isinstance(kinds, str) else kinds
    for k in kinds:
        types = _JSON_TYPES.get(k, ())
        if isinstance(value, types) and not (k in ("integer", "number") and isinstance(value, bool)):
            return True
    return value is None and bool(schema.get("nullable"))


class Tool:
    """One typed function offered to the model; schema from its signature and docstring."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.schema = get_json_schema(fn)
        self.name = self.schema["function"]["name"]
        params = self.schema["function"]["parameters"]
        self.properties: dict = params.get("properties", {})
        self.required: list = params.get("required", [])

    def check(self, arguments: dict) -> None:
        """Raises ToolError naming what is wrong with the arguments."""
        missing = [a for a in self.required if a not in arguments]
        if missing:
            raise ToolError(f"{self.name} is missing required argument(s) {missing}")
        unknown = sorted(set(arguments) - set(self.properties))
        if unknown:
            raise ToolError(f"{self.name} has no argument(s) {unknown}; it takes {sorted(self.properties)}")
        for arg, value in arguments.items():
            schema = self.properties[arg]
            if not _type_ok(value, schema):
                raise ToolError(f"argument {arg!r} of {self.name} must be of type {schema.get('type')}, "
                                f"got {type(value).__name__}")
            if "enum" in schema and value not in schema["enum"]:
                raise ToolError(f"argument {arg!r} of {self.name} must be one of {schema['enum']}")

    def __call__(self, arguments: dict) -> Any:
        self.check(arguments)
        return self.fn(**arguments)


class Toolbox:
    """The tools of an environment by name."""

    def __init__(self, fns: Sequence[Callable[..., Any]]):
        self.tools = {t.name: t for t in (Tool(f) for f in fns)}

    def schemas(self) -> list[dict]:
        """JSON schemas, for chat templates that take `tools`."""
        return [t.schema for t in self.tools.values()]

    def call(self, call: ToolCall) -> Any:
        """Runs a parsed call; ToolError for an unknown tool or bad arguments (other exceptions
        are the tool's own)."""
        tool = self.tools.get(call.name)
        if tool is None:
            raise ToolError(f"unknown tool {call.name!r}; the tools are {sorted(self.tools)}")
        return tool(call.arguments)

    def system_prompt(self, preamble: str) -> str:
        """preamble + the tools' schemas + how to call them (Hermes form)."""
        specs = "\n".join(json.dumps(s) for s in self.schemas())
        return (f"{preamble}\n\nYou can call these tools:\n<tools>\n{specs}\n</tools>\n"
                "To call a tool, write <tool_call>{\"name\": <tool name>, \"arguments\": <arguments object>}"
                "</tool_call>; its result comes back in the next message. Write your final answer "
                "without a tool call.")
