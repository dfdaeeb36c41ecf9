"""JSON schemas for tools given as typed Python functions with Google-style docstrings.

The output matches transformers' get_json_schema (key order included, since templates print it
with tojson): {"type": "function", "function": {"name", "description", "parameters": {"type":
"object", "properties", "required"}, "return"?}}.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any

_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_BARE = {**{t: {"type": name} for t, name in _SCALARS.items()},
         list: {"type": "array"}, tuple: {"type": "array"}, dict: {"type": "object"}, Any: {}}
_HEADERS = ("Args:", "Returns:", "Raises:")
# "name:" or "name (type):" opening an argument's description
_ARG = re.compile(r"^([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:\s*(.*)$")
_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)


class ToolSchemaError(ValueError):
    """A function cannot be described as a tool (missing hint or docstring entry, odd type)."""


def _enum(values: list) -> dict:
    bad = [v for v in values if type(v) not in _SCALARS]
    if bad:
        raise ToolSchemaError(f"enum values must be JSON scalars (int, float, str, bool, None), got {bad!r}")
    kinds = list(dict.fromkeys(_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _schema(hint: Any) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None:
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            values = [member.value for member in hint]
            if not values:
                raise ToolSchemaError(f"the Enum {hint.__name__} has no members")
            return _enum(values)
        if hint in _BARE:
            return dict(_BARE[hint])
        raise ToolSchemaError(f"cannot describe the type hint {hint!r} in JSON schema (use basic types, Enum, "
                              "Literal, or list/tuple/dict/Union of those, or pass a JSON schema dict)")
    if origin is typing.Union or origin is types.UnionType:
        subtypes = [_schema(t) for t in args if t is not type(None)]
        if len(subtypes) == 1:
            out = subtypes[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subtypes):
            names = sorted({s["type"] for s in subtypes})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subtypes}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is typing.Literal and args:
        return _enum(list(args))
    if origin is list:
        return {"type": "array", "items": _schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or ... in args:
            raise ToolSchemaError(f"tuple hint {hint!r}: use list[...] for one element type or variable length")
        return {"type": "array", "prefixItems": [_schema(t) for t in args]}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema(args[1])} if len(args) == 2 else {"type": "object"}
    raise ToolSchemaError(f"cannot describe the type hint {hint!r} in JSON schema")


def _parameters(func: Callable) -> dict:
    hints = typing.get_type_hints(func)
    params = inspect.signature(func).parameters
    first = next(iter(params), None)
    # an unannotated self/cls is the implicit receiver, not a tool argument
    receiver = first if first in ("self", "cls") and params[first].annotation is inspect.Parameter.empty else None
    required = []
    for name, p in params.items():
        if name == receiver:
            continue
        if p.annotation is inspect.Parameter.empty:
            raise ToolSchemaError(f"argument {name!r} of {func.__name__} has no type hint")
        if p.default is inspect.Parameter.empty:
            required.append(name)
    properties = {}
    for name, hint in hints.items():
        if name == receiver:
            continue
        if name == "return":
            try:  # the model never writes the return value: an odd return hint is left out
                properties[name] = _schema(hint)
            except ToolSchemaError:
                pass
        else:
            properties[name] = _schema(hint)
    out = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    return out


def parse_docstring(doc: str) -> tuple[str, dict[str, str], str | None]:
    """(description, {argument: description}, returns) of a Google-style docstring."""
    lines = doc.split("\n")
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in lines:
        if line.strip() in _HEADERS:
            current = line.strip()[:-1]
            sections.setdefault(current, [])
            continue
        sections[current].append(line)
    description = "\n".join(sections[""]).strip()
    args: dict[str, str] = {}
    name, indent, parts = None, "", []
    for line in sections.get("Args", []):
        if not line.strip():
            continue
        m = _ARG.match(line)
        # a new argument starts at the same or a shallower indent; deeper lines continue the last one
        if m and (name is None or not (m.group(1).startswith(indent) and len(m.group(1)) > len(indent))):
            if name is not None:
                args[name] = " ".join(p for p in parts if p)
            indent, name, parts = m.group(1), m.group(2), [m.group(3).strip()]
        elif name is not None:
            parts.append(line.strip())
    if name is not None:
        args[name] = " ".join(p for p in parts if p)
    returns = "\n".join(sections["Returns"]).strip() if "Returns" in sections else None
    return description, args, returns


def get_json_schema(func: Callable) -> dict:
    """The tool schema of a typed function; every argument needs a docstring entry. An entry ending
    in `(choices: ["a", "b"])` becomes an enum."""
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise ToolSchemaError(f"cannot describe {name} as a tool: it has no docstring")
    description, arg_docs, returns_doc = parse_docstring(doc.strip())
    parameters = _parameters(func)
    returns = parameters["properties"].pop("return", None)
    if returns is not None and returns_doc is not None:
        returns["description"] = returns_doc
    for arg, schema in parameters["properties"].items():
        if arg not in arg_docs:
            raise ToolSchemaError(f"cannot describe {name} as a tool: its docstring has no entry for {arg!r}")
        text = arg_docs[arg]
        choices = _CHOICES.search(text)
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices.group(1))]
            text = text[:choices.start()].strip()
        schema["description"] = text
    out = {"name": name, "description": description, "parameters": parameters}
    if returns is not None:
        out["return"] = returns
    return {"type": "function", "function": out}
