"""The tokenizer inside the SmolLM2 GGUF: converted ids, decoding, chat template and the run-store
round trip, each compared with transformers' own GGUF tokenizer."""

import json
import os

import pytest

from rlax_tpu import run_meta, store_layout, tokenizer
from rlax_tpu.config import ConfigError, finalize, get_base_config
from rlax_tpu.kvstore import KVStore
from tests.helpers.checkpoints import smollm2_or_skip

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world! 🚀🔥 emoji 👩‍👩‍👧‍👦 and flags 🇫🇷",
    "Euler: $e^{i\\pi} + 1 = 0$, \\frac{a}{b}, \\boxed{\\sqrt{2}}, \\int_0^1 x^2\\,dx",
    "def f(x):\n    if x:\n\treturn [i ** 2 for i in range(10)]  # tab\n\n\n    pass\n",
    "数学很有趣。中文分词测试",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "Привет, мир! Ёжик в тумане.",
    "123 4567 89012 3.14159 -42 1e10 0x1F 1,000,000 ½ ²",
    "   leading   and trailing   \n\n\n  \t\t spaces    ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><file_sep> not<|im_start special",
    "",
    "a",
]


def _messages(system: bool):
    head = [{"role": "system", "content": "You are terse."}] if system else []
    return head + [{"role": "user", "content": "What is 7 * 6? Answer in \\boxed{}."},
                   {"role": "assistant", "content": "\\boxed{42}"},
                   {"role": "user", "content": "And 2 ** 10? 🤔"}]


def multiply(x: float, y: float) -> float:
    """Multiplies two numbers.

    Args:
        x: The first number.
        y: The second number.

    Returns:
        The product.
    """
    return x * y


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_or_skip()


@pytest.fixture(scope="module")
def config(gguf_path):
    config = get_base_config()
    config.tokenizer.kind = "gguf"
    config.tokenizer.path = gguf_path
    return config


@pytest.fixture(scope="module")
def ours(config, tmp_path_factory):
    return tokenizer.build(config.tokenizer, str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def peer(gguf_path):
    # The class AutoTokenizer resolves to for this file, without AutoTokenizer's slow read of the
    # model config: the same GGUF tokenizer conversion.
    return transformers.PreTrainedTokenizerFast.from_pretrained(os.path.dirname(gguf_path),
                                                                gguf_file=os.path.basename(gguf_path))


def test_converted_files_match_transformers_tokenizer(ours, peer, tmp_path):
    peer.save_pretrained(str(tmp_path))
    with open(tmp_path / "tokenizer.json", encoding="utf-8") as f:
        theirs = json.load(f)
    with open(ours.path, encoding="utf-8") as f:
        assert json.load(f) == theirs
    assert set(ours.files()) == {"tokenizer.json", "tokenizer_config.json"}


def test_special_tokens(ours, peer):
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    assert ours.vocab_size == len(peer) == 49152
    assert ours.special_tokens == peer.special_tokens_map
    assert ours.id_to_token(2) == "<|im_end|>" and ours.token_to_id("<|im_start|>") == 1


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_decoding_match_transformers(ours, peer, text):
    ids = ours.encode(text)
    assert ids == peer.encode(text, add_special_tokens=False)
    assert ids == peer(text)["input_ids"]  # the file asks for no BOS
    assert ours.decode(ids, skip_special=False) == text == peer.decode(ids)
    assert ours.decode(ids) == peer.decode(ids, skip_special_tokens=True)


CASES = {
    "user": ([{"role": "user", "content": "Hi there"}], None),
    "system": (_messages(system=True), None),
    "no_system": (_messages(system=False), None),
    "tools": (_messages(system=False), [multiply, WEATHER]),
}


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_chat_template_matches_transformers(ours, peer, case, gen):
    messages, tools = CASES[case]
    text = ours.apply_chat_template(messages, add_generation_prompt=gen, tools=tools)
    assert text == peer.apply_chat_template(messages, add_generation_prompt=gen, tools=tools, tokenize=False)
    assert ours.encode_chat(messages, add_generation_prompt=gen, tools=tools) == peer.apply_chat_template(
        messages, add_generation_prompt=gen, tools=tools, tokenize=True, return_dict=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n") == gen


def test_encode_prompt_uses_the_chat_template(ours, peer, config, tmp_path):
    prompt = "Compute 3 + 4 * 2."
    want = peer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
    assert ours.encode_prompt(prompt) == want
    assert want[0] == ours.bos_id and want.count(ours.bos_id) == 3  # template's <|im_start|>, no extra BOS
    assert ours.encode_prompt([{"role": "user", "content": prompt}]) == want
    assert ours.apply_template(prompt) == peer.decode(want)
    c = config.copy_and_resolve_references()
    c.tokenizer.system_prompt = "Think step by step."
    tok = tokenizer.build(c.tokenizer, str(tmp_path))
    assert tok.encode_prompt(prompt) == peer.apply_chat_template(
        [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": prompt}],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    c.tokenizer.use_chat_template = False
    tok = tokenizer.build(c.tokenizer, str(tmp_path))
    assert tok.encode_prompt(prompt) == [tok.bos_id] + peer.encode(prompt + "\n", add_special_tokens=False)


def test_run_store_round_trip(ours, config, tmp_path):
    kv = KVStore.open("", str(tmp_path))
    run_meta.write_tokenizer(kv, ours)
    run_meta.write_tokenizer(kv, ours)  # idempotent: the same bytes
    assert sorted(kv.list(store_layout.TOKENIZER_PREFIX)) == [store_layout.TOKENIZER_PREFIX + "tokenizer.json",
                                                         store_layout.TOKENIZER_PREFIX + "tokenizer_config.json"]
    cache = tmp_path / "worker"
    cache.mkdir()
    (cache / "chat_template.jinja").write_text("{{ stale }}")  # another run's leftovers are ignored
    tok = run_meta.read_tokenizer(kv, config, str(cache))
    assert tok.files() == ours.files()
    assert tok.chat_template.source == ours.chat_template.source
    messages, tools = CASES["tools"]
    assert tok.encode_chat(messages, tools=tools) == ours.encode_chat(messages, tools=tools)
    assert tok.encode_prompt("1+1?") == ours.encode_prompt("1+1?")


def test_template_error_names_the_gguf_key(ours, gguf_path):
    with pytest.raises(tokenizer.ChatTemplateError) as e:
        ours.apply_chat_template([{"role": "user"}])  # the template reads message['content']
    assert f"{gguf_path}:tokenizer.chat_template" in str(e.value) and "content" in str(e.value)


def test_conversion_is_deterministic(gguf_path, ours, tmp_path):
    out = tokenizer.convert_gguf(gguf_path, str(tmp_path))
    with open(out, "rb") as a, open(ours.path, "rb") as b:
        assert a.read() == b.read()


def test_bad_gguf_and_config_name_the_field(tmp_path):
    gguf = pytest.importorskip("gguf")
    config = get_base_config()
    config.tokenizer.kind = "gguf"
    config.tokenizer.path = str(tmp_path / "model.bin")
    with pytest.raises(ConfigError, match=r"tokenizer\.path.*\.gguf"):
        finalize(config)
    config = get_base_config()
    config.tokenizer.kind = "gguf"
    with pytest.raises(ConfigError, match=r"tokenizer\.path.*required"):
        finalize(config)
    config.tokenizer.path = str(tmp_path / "missing.gguf")
    with pytest.raises(ConfigError, match=r"tokenizer\.path.*missing\.gguf"):
        tokenizer.build(config.tokenizer)
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf at all")
    config.tokenizer.path = str(bogus)
    with pytest.raises(ConfigError, match=r"tokenizer\.path.*bogus\.gguf.*not a GGUF"):
        tokenizer.build(config.tokenizer)
    # a sentencepiece vocabulary ('llama') is named by its key, not converted wrongly
    spm = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(spm), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config.tokenizer.path = str(spm)
    with pytest.raises(ConfigError, match=r"tokenizer\.ggml\.model='llama'"):
        tokenizer.build(config.tokenizer)


LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def small_gguf(gguf_path, tmp_path_factory):
    """A 3000-token cut of SmolLM2's vocabulary written as a GGUF that asks for a BOS, splits text
    the Qwen2 way, has a user-defined token and a template that writes bos_token itself."""
    gguf = pytest.importorskip("gguf")
    from rlax_tpu.tokenizer.gguf_convert import read_metadata

    meta = read_metadata(gguf_path)
    tokens = meta["tokenizer.ggml.tokens"][:3000]
    kept = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"]
              if (p := m.split(" "))[0] in kept and p[1] in kept and p[0] + p[1] in kept]
    types = meta["tokenizer.ggml.token_type"][:3000]
    types[6] = 4  # <filename>: user-defined, matched whole but not special
    path = str(tmp_path_factory.mktemp("small") / "small.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(LLAMA3_STYLE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bos_adding_gguf_gets_one_bos(small_gguf, tmp_path):
    peer = transformers.PreTrainedTokenizerFast.from_pretrained(os.path.dirname(small_gguf),
                                                                gguf_file=os.path.basename(small_gguf))
    peer.save_pretrained(str(tmp_path / "peer"))
    config = get_base_config()
    config.tokenizer.kind, config.tokenizer.path = "gguf", small_gguf
    ours = tokenizer.build(config.tokenizer, str(tmp_path / "run"))
    with open(tmp_path / "peer" / "tokenizer.json", encoding="utf-8") as a, open(ours.path, encoding="utf-8") as b:
        assert json.load(a) == json.load(b)
    for text in TEXTS + ["x <filename> y 12345"]:
        assert ours.encode(text) == peer.encode(text, add_special_tokens=False)
        assert [ours.bos_id] + ours.encode(text) == peer(text)["input_ids"]  # this file asks for a BOS
    ids = ours.encode("a <filename> b")
    assert ours.token_to_id("<filename>") in ids  # user-defined: matched whole, decoded as text
    assert ours.decode(ids) == "a <filename> b" == peer.decode(ids, skip_special_tokens=True)
    messages = _messages(system=True)
    want = peer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.encode_chat(messages) == want and want.count(ours.bos_id) == 1 and want[0] == ours.bos_id
    assert ours.encode_prompt("hi") == peer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    config.tokenizer.use_chat_template = False
    config.tokenizer.prompt_template = "<|endoftext|>{prompt}"  # writes the BOS itself: not doubled
    plain = tokenizer.build(config.tokenizer, str(tmp_path / "run"))
    assert plain.encode_prompt("hi") == peer("hi")["input_ids"]
