"""The tokenizer inside a GGUF file, converted once into tokenizer.json + tokenizer_config.json.

A GGUF stores a byte-level BPE vocabulary as metadata under llama.cpp's key names
(tokenizer.ggml.tokens / merges / token_type / pre / bos_token_id ...) and the chat template under
tokenizer.chat_template. convert_gguf() turns that into the two Hugging Face files the way
transformers' GGUF loader builds its tokenizer (same vocabulary spelling, pre-tokenizer per
tokenizer.ggml.pre, control tokens as special added tokens, user-defined ones as plain added
tokens), so HFTokenizer loads it and the run store and exports need nothing but those files.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile

_VERSIONS = (2, 3)
# GGUF metadata value types -> struct format (little endian)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

# Split regexes per tokenizer.ggml.pre, as transformers applies them (the merges were learned on
# text split this way); any other value keeps GPT-2's byte-level regex.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}


class GGUFError(ValueError):
    """A GGUF file is unreadable or describes a tokenizer this converter cannot build."""


def _read_string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    return bytes(buf[pos:pos + n]).decode("utf-8"), pos + n


def _read_value(buf, pos: int, vtype: int, path: str, key: str):
    if vtype in _SCALAR:
        fmt = _SCALAR[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        return _read_string(buf, pos)
    if vtype == _ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _SCALAR:
            fmt = _SCALAR[etype]
            size = struct.calcsize(fmt)
            return list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos)), pos + count * size
        out = []
        for _ in range(count):
            value, pos = _read_value(buf, pos, etype, path, key)
            out.append(value)
        return out, pos
    raise GGUFError(f"{path}: metadata key {key!r} has unknown value type {vtype}")


def read_metadata(path: str) -> dict:
    """All metadata key/values of a GGUF file (no tensor data is read)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic bytes)")
        version, _, count = struct.unpack_from("<IQQ", buf, 4)
        if version not in _VERSIONS:
            raise GGUFError(f"{path}: GGUF version {version} (this reader handles {_VERSIONS})")
        pos, meta = 24, {}
        try:
            for _ in range(count):
                key, pos = _read_string(buf, pos)
                (vtype,) = struct.unpack_from("<I", buf, pos)
                meta[key], pos = _read_value(buf, pos + 4, vtype, path, key)
        except (struct.error, UnicodeDecodeError) as e:
            raise GGUFError(f"{path}: corrupt metadata after key {len(meta)}: {e}") from e
    return meta


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level vocabularies are spelled in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _require(meta: dict, key: str, path: str):
    if key not in meta:
        raise GGUFError(f"{path}: metadata key {key!r} is missing")
    return meta[key]


def build_tokenizer(meta: dict, path: str = "<gguf>"):
    """(tokenizers.Tokenizer, tokenizer_config dict) for GGUF metadata with a byte-level BPE."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _require(meta, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens = _require(meta, "tokenizer.ggml.tokens", path)
    merges = _require(meta, "tokenizer.ggml.merges", path)
    token_types = meta.get("tokenizer.ggml.token_type", [0] * len(tokens))
    if len(token_types) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens")
    spelled = _bytes_to_unicode()
    alphabet = set(spelled.values())
    # A token with characters outside the byte alphabet is stored as text: respell its UTF-8 bytes.
    vocab = {t if set(t) <= alphabet else "".join(spelled[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_end|>) stay whole and are special; a "control" token outside the byte
    # alphabet is a mislabel that would grow the vocabulary, so it is skipped.
    typed = list(zip(tokens, token_types, strict=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in typed if ty == _CONTROL and set(t) <= alphabet])
    known = tok.get_vocab()
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in typed if ty == _USER_DEFINED and t in known])
    config: dict = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise GGUFError(f"{path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary ({len(tokens)})")
        config[name] = tokens[token_id]
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    named = [config[n] for n in ("bos_token", "eos_token", "unk_token", "pad_token") if n in config]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in dict.fromkeys(named) if t not in added])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and "bos_token" in config
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in config
    bos, eos = config.get("bos_token"), config.get("eos_token")
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    specials = [(t, tok.token_to_id(t)) for t in dict.fromkeys([bos] * add_bos + [eos] * add_eos)]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    config.update(add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False,
                  tokenizer_class="PreTrainedTokenizerFast")
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, config


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tok-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # a reader never sees a half-written file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def convert_gguf(path: str, out_dir: str | None = None) -> str:
    """Writes tokenizer.json and tokenizer_config.json for the GGUF at path into out_dir (a new
    temporary directory if None); returns the tokenizer.json path. Deterministic: the same GGUF
    gives the same bytes."""
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file not found: {path!r}")
    tok, config = build_tokenizer(read_metadata(path), path)
    out_dir = out_dir or tempfile.mkdtemp(prefix="rlax_tpu_tokenizer_")
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, "tokenizer_config.json"),
                  json.dumps(config, indent=2, ensure_ascii=False).encode("utf-8"))
    out = os.path.join(out_dir, "tokenizer.json")
    _write_atomic(out, tok.to_str(pretty=True).encode("utf-8"))
    return out
