"""Chat templates: a model's own jinja template, rendered as transformers' apply_chat_template does.

Same sandboxed environment (trim_blocks, lstrip_blocks, loop controls, the `generation` tag),
the same helpers (raise_exception, strftime_now, a tojson that keeps non-ASCII and HTML
characters, dict, namespace), the same template variables (messages, tools, documents,
add_generation_prompt, the tokenizer's special tokens such as bos_token, and extra keyword
arguments), and the same input clean-up (message keys whose value is None are dropped). Undefined
variables render as '' exactly as there; using one in an operation fails, and every failure is a
ChatTemplateError naming the template's origin (file or GGUF key) and the jinja problem.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rlax_tpu.tokenizer.tool_schema import get_json_schema

# Names a message's reasoning may come under; templates read the first (gpt-oss ones read 'thinking').
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render; the message names its origin and the problem."""

    def __init__(self, origin: str, problem: str):
        self.origin, self.problem = origin, problem
        super().__init__(f"chat template {origin}: {problem}")


class _Raised(jinja2.exceptions.TemplateError):
    """raise_exception() called by the template itself."""


def _raise_exception(message):
    raise _Raised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # dict(...) without exposing the dict type itself to the sandbox.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    # A namespace that refuses underscore names, so a template cannot reach interpreter internals.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} marks assistant text for masks; here it renders as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_Namespace)
    return env


_ENV = _environment()


def _plain(value: Any) -> Any:
    """A copy made of JSON-like types only: the sandbox never sees the caller's rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """Messages as plain dicts without None-valued keys, reasoning copied under its alias names."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    out = []
    for message in messages:
        message = _plain(message)
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts (or dataclasses / pydantic models), got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def tool_schemas(tools: Sequence[dict | Callable] | None) -> list[dict] | None:
    """JSON schemas as given, typed Python functions converted with get_json_schema."""
    if tools is None:
        return None
    schemas = []
    for tool in tools:
        if isinstance(tool, Mapping):
            schemas.append(dict(tool))
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            schemas.append(get_json_schema(tool))
        else:
            raise TypeError(f"a tool must be a JSON schema dict or a typed Python function, got {tool!r}")
    return _plain(schemas)


def _template_line(tb) -> int | None:
    """The template line an exception came from (jinja rewrites tracebacks to template frames)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class ChatTemplate:
    """One jinja chat template, where it came from, and the special tokens it may reference."""

    def __init__(self, source: str, origin: str, special_tokens: Mapping[str, str] | None = None):
        if not isinstance(source, str):
            raise ChatTemplateError(origin, f"must be a string, got {type(source).__name__}")
        self.source, self.origin = source, origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(origin, f"syntax error at line {e.lineno}: {e.message}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.origin})"

    def render(self, messages: Sequence[Any], *, add_generation_prompt: bool = False,
               tools: Sequence[dict | Callable] | None = None, documents: Sequence[dict] | None = None,
               **template_vars: Any) -> str:
        """The rendered conversation; extra keyword arguments become template variables."""
        chat = normalize_messages(messages)
        schemas = tool_schemas(tools)
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise TypeError("documents must be a list of dicts (e.g. with 'title' and 'text')")
        variables = {**self.special_tokens, **_plain(template_vars)}
        try:
            return self._template.render(messages=chat, tools=schemas, documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt, **variables)
        except _Raised as e:
            raise ChatTemplateError(self.origin, f"raise_exception: {e.message}") from None
        except jinja2.UndefinedError as e:
            raise ChatTemplateError(self.origin, f"undefined variable at line {_template_line(e.__traceback__)}: "
                                    f"{e.message}") from None
        except Exception as e:  # a type error inside the template, a sandbox violation, ...
            raise ChatTemplateError(self.origin, f"{type(e).__name__} at line {_template_line(e.__traceback__)}: "
                                    f"{e}") from None


def pick_template(templates: Mapping[str, ChatTemplate], tools=None, where: str = "") -> ChatTemplate:
    """The template to use among named ones: 'tool_use' when tools are given and it exists, else
    'default' (transformers' rule)."""
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ChatTemplateError(where or "(none)", f"several named templates and no 'default': {sorted(templates)}")
