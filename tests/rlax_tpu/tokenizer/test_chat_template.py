"""Chat templates rendered like transformers' apply_chat_template: a Qwen2.5-style template with
tools, named templates, the jinja helpers, tool schemas from Python functions, and errors that
name the template."""
# ruff: noqa: E501 (the Qwen2.5-style template below is kept verbatim)

import enum
import json
import os
from typing import Any, Literal

import pytest

from rlax_tpu import tokenizer
from rlax_tpu.tokenizer import ChatTemplate, ChatTemplateError, ToolSchemaError, get_json_schema
from tests.helpers.checkpoints import smollm2_or_skip

transformers = pytest.importorskip("transformers")
from transformers.utils import get_json_schema as hf_get_json_schema  # noqa: E402

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def get_weather(city: str, unit: Unit = Unit.CELSIUS, days: int | None = None) -> dict[str, float]:
    """Gets the weather forecast for a city.

    Uses the nearest station.

    Args:
        city: The city, e.g. "Zürich" or 北京.
        unit: Temperature unit.
        days (int): How many days ahead; None for
            today only, spread over
            two lines.

    Returns:
        Temperatures by day.
    """
    return {}


def search(query: str, tags: list[str], limit: Literal[5, 10, 20] = 10, exact: bool = False,
           weights: dict[str, float] | None = None, span: tuple[int, int] = (0, 1), extra: Any = None,
           mode: str | int = "fast", flavor: str = "plain") -> list:
    """Searches the index.

    Args:
        query: Search text.
        tags: Tags to filter by.
        limit: Number of hits.
        exact: Exact match only.
        weights: Field weights.
        span: Index range.
        extra: Anything.
        mode: Mode name or level.
        flavor: Output flavor (choices: ["plain", "rich"])
    """
    return []


class Calculator:
    def add(self, a: float, b: float = 0.0):
        """Adds numbers.

        Args:
            a: First.
            b: Second.
        """
        return a + b


SCHEMA_TOOL = {"type": "function", "function": {
    "name": "lookup", "description": "Looks up a word <b>&</b> its sense.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string", "description": "Wörd"}},
                   "required": ["word"]}}}

MULTI_TURN = [
    {"role": "user", "content": "Weather in Paris, and 2+2?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
        {"type": "function", "function": {"name": "lookup", "arguments": {"word": "météo"}}}]},
    {"role": "tool", "name": "get_weather", "content": '{"today": 21.5}'},
    {"role": "tool", "name": "lookup", "content": "weather"},
    {"role": "assistant", "content": "It is 21.5 °C. And 2+2 = \\boxed{4}."},
    {"role": "user", "content": "Thanks!", "reasoning_content": None},
]

CASES = {
    "no_system": ([{"role": "user", "content": "Hello 👋"}], None),
    "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None),
    "tools": ([{"role": "user", "content": "Weather in 東京?"}], [get_weather, SCHEMA_TOOL]),
    "system_tools": ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Find cats"}],
                     [search, Calculator().add]),
    "multi_turn_tool_calls": (MULTI_TURN, [get_weather, SCHEMA_TOOL]),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """SmolLM2's converted tokenizer.json (any real vocabulary does)."""
    gguf_path = smollm2_or_skip()
    out = str(tmp_path_factory.mktemp("smollm2"))
    tokenizer.convert_gguf(gguf_path, out)
    return out


def _with_config(base_dir, directory, **entries):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(base_dir, "tokenizer.json"), "rb") as f:
        blob = f.read()
    with open(os.path.join(directory, "tokenizer.json"), "wb") as f:
        f.write(blob)
    with open(os.path.join(base_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(entries)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return directory


@pytest.fixture(scope="module")
def qwen(base_dir, tmp_path_factory):
    """(ours, transformers') for a directory whose tokenizer_config.json holds the Qwen2.5 template."""
    d = _with_config(base_dir, str(tmp_path_factory.mktemp("qwen")), chat_template=QWEN25,
                     bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return tokenizer.HFTokenizer(d), transformers.AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_qwen25_template_matches_transformers(qwen, case, gen):
    ours, peer = qwen
    messages, tools = CASES[case]
    text = ours.apply_chat_template(messages, add_generation_prompt=gen, tools=tools)
    assert text == peer.apply_chat_template(messages, add_generation_prompt=gen, tools=tools, tokenize=False)
    assert ours.encode_chat(messages, add_generation_prompt=gen, tools=tools) == peer.apply_chat_template(
        messages, add_generation_prompt=gen, tools=tools, tokenize=True, return_dict=False)
    if case in ("no_system", "tools"):
        assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in text
    if tools:
        assert '"name": "get_weather"' in text or '"name": "search"' in text


def test_qwen25_encode_prompt(qwen):
    ours, peer = qwen
    assert ours.encode_prompt("Solve x+1=2.", tools=[get_weather]) == peer.apply_chat_template(
        [{"role": "user", "content": "Solve x+1=2."}], tools=[get_weather], add_generation_prompt=True,
        tokenize=True, return_dict=False)
    assert ours.bos_id is None  # bos_token null: nothing is prepended


def test_template_file_and_named_templates(base_dir, tmp_path):
    """chat_template.jinja wins over tokenizer_config.json; a list of named templates picks
    'tool_use' when tools are given, as transformers does."""
    named = [{"name": "default", "template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"},
             {"name": "tool_use", "template": "{{ tools | length }} tools|{{ messages[-1].content }}"}]
    d = _with_config(base_dir, str(tmp_path / "named"), chat_template=named)
    ours, peer = tokenizer.HFTokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "hi"}]
    for tools in (None, [SCHEMA_TOOL]):
        assert ours.apply_chat_template(msgs, tools=tools) == peer.apply_chat_template(
            msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(msgs, tools=[SCHEMA_TOOL]) == "1 tools|hi"
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{{ bos_token }}{{ messages[0].content }}!")
    ours = tokenizer.HFTokenizer(d)
    assert set(ours.chat_templates) == {"default"} and ours.files()["chat_template.jinja"]
    assert ours.apply_chat_template(msgs) == "<|im_start|>hi!"


def test_jinja_environment_matches_transformers(qwen):
    _, peer = qwen
    source = (
        "{% set ns = namespace(n=0, seen=[]) %}"
        "{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
        "{% if m.role == 'tool' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}\n"
        "    {% if m.thinking is defined %}<think>{{ m.thinking }}</think>{% endif %}\n"
        "{% endfor %}{{ ns.n }}|{{ eos_token }}|{{ dict(a=1, b=[1, 2]) | tojson(indent=2) }}|"
        "{{ documents | map(attribute='title') | join(',') }}|{{ strftime_now('%Y') }}|{{ custom }}|"
        "{{ undefined_thing }}|{{ tools is none }}|{{ 'x' | tojson(sort_keys=true) }}"
    )
    msgs = [{"role": "user", "content": "<a & b> \"q\" ü"}, {"role": "tool", "content": "t"},
            {"role": "assistant", "content": "ok", "reasoning_content": "hmm"}, {"role": "user", "content": "z"}]
    docs = [{"title": "A", "text": "x"}, {"title": "B", "text": "y"}]
    ours = ChatTemplate(source, "inline", {"eos_token": "<|im_end|>"})
    got = ours.render(msgs, add_generation_prompt=True, documents=docs, custom=3)
    assert got == peer.apply_chat_template(msgs, chat_template=source, documents=docs, custom=3,
                                           add_generation_prompt=True, tokenize=False)
    assert "<think>hmm</think>" in got and '"<a & b> \\"q\\" ü"' in got


def test_render_errors_name_the_template(base_dir, tmp_path):
    d = _with_config(base_dir, str(tmp_path / "bad"), chat_template="{{ messages[0].content }}\n{{ foo.bar }}")
    tok = tokenizer.HFTokenizer(d)
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json:chat_template.*line 2.*'foo' is undefined"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    d = _with_config(base_dir, str(tmp_path / "raise"),
                     chat_template="{% if messages[0].role != 'system' %}"
                                   "{{ raise_exception('System message required, got ' + messages[0].role) }}"
                                   "{% endif %}")
    with pytest.raises(ChatTemplateError, match=r"raise.*chat_template.*raise_exception: System message "
                                                r"required, got user"):
        tokenizer.HFTokenizer(d).encode_prompt("x")
    with pytest.raises(ChatTemplateError, match=r"my\.jinja: syntax error at line 1"):
        ChatTemplate("{% if %}", "my.jinja")
    with pytest.raises(ChatTemplateError, match=r"ns\.jinja: SecurityError"):
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}", "ns.jinja").render([{"role": "user"}])
    d = _with_config(base_dir, str(tmp_path / "badtype"), chat_template=3)
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json:chat_template.*string or a list"):
        tokenizer.HFTokenizer(d)
    plain = tokenizer.HFTokenizer(_with_config(base_dir, str(tmp_path / "none"), chat_template=None))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="prompt_template takes a single prompt string"):
        plain.encode_prompt([{"role": "user", "content": "x"}])


def test_prompt_template_fallback_adds_bos_once(base_dir, tmp_path):
    d = _with_config(base_dir, str(tmp_path / "plain"), chat_template=None)
    tok = tokenizer.HFTokenizer(d, prompt_template="Q: {prompt}\nA:")
    assert tok.chat_template is None and tok.bos_id == 1
    assert tok.encode_prompt("1+1") == [1] + tok.encode("Q: 1+1\nA:")
    tok = tokenizer.HFTokenizer(d, prompt_template="<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode_prompt("1+1")
    assert ids[0] == 1 and ids.count(1) == 2  # the template's own <|im_start|> is the BOS: not doubled
    templated = tokenizer.HFTokenizer(base_dir, prompt_template="Q: {prompt}\nA:", use_chat_template=False)
    assert templated.chat_template is None and templated.apply_template("1+1") == "Q: 1+1\nA:"


@pytest.mark.parametrize("fn", [get_weather, search, Calculator().add, Calculator.add])
def test_json_schema_matches_transformers(fn):
    assert get_json_schema(fn) == hf_get_json_schema(fn)
    assert json.dumps(get_json_schema(fn)) == json.dumps(hf_get_json_schema(fn))  # key order too


def test_json_schema_errors():
    def no_doc(x: int):
        return x

    def missing_arg(x: int, y: int):
        """Adds.

        Args:
            x: First.
        """

    def untyped(x):
        """Args:
            x: First.
        """

    for fn, needle in ((no_doc, "no docstring"), (missing_arg, "'y'"), (untyped, "no type hint")):
        with pytest.raises(ToolSchemaError, match=needle):
            get_json_schema(fn)
    with pytest.raises(TypeError, match="JSON schema dict or a typed Python function"):
        ChatTemplate("{{ tools }}", "t").render([{"role": "user"}], tools=["not a tool"])
