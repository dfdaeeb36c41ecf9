"""Hugging Face tokenizer.json files (the `hf` extra: the `tokenizers` package)."""

from __future__ import annotations

import json
import os

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.tokenizer.base import Tokenizer
from rlax_tpu.tokenizer.chat import ChatTemplate, ChatTemplateError

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# The named special tokens transformers passes to chat templates as variables (bos_token, ...).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

_GUESS = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<eos>", "[SEP]"),
    "pad": ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"),
}


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("tokenizer.kind='hf' needs the `tokenizers` package: "
                          "pip install 'rlax_tpu[hf]'") from e
    return tokenizers


def _config_token(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _special_tokens_map(cfg: dict, explicit: dict[str, str]) -> dict[str, str]:
    """Template variables for the special tokens: tokenizer_config.json's, explicit names winning."""
    out = {name: tok for name in SPECIAL_TOKEN_NAMES if (tok := _config_token(cfg.get(name)))}
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, dict):  # named extras (image_token, ...) are template variables too
        out.update({name: tok for name, value in extra.items() if (tok := _config_token(value))})
    out.update(explicit)
    return out


class HFTokenizer(Tokenizer):
    """A tokenizers.Tokenizer from tokenizer.json (a file, or a directory holding one).

    Special tokens: explicit names win, then tokenizer_config.json next to the file, then common
    names. No BOS token -> bos_id None; no pad token -> pad_id = eos_id. Chat templates, as
    transformers finds them: chat_template.jinja (plus additional_chat_templates/<name>.jinja)
    next to the file, else tokenizer_config.json's chat_template (a string, or a list of
    {"name", "template"}). chat_origin names the template in errors instead of its file (e.g.
    the GGUF key it was converted from).
    """

    def __init__(self, path: str, bos_token: str = "", eos_token: str = "", pad_token: str = "",
                 prompt_template: str = "{prompt}", system_prompt: str = "", use_chat_template: bool = True,
                 chat_origin: str | None = None):
        tokenizers = _import_tokenizers()
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ConfigError("tokenizer.path", f"Hugging Face tokenizer file not found: {file!r}")
        self.path = file
        self.tok = tokenizers.Tokenizer.from_file(file)
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        self.use_chat_template = use_chat_template
        directory = os.path.dirname(file)
        self._files = [file]
        cfg = {}
        cfg_file = os.path.join(directory, CONFIG_FILE)
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                try:
                    cfg = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError("tokenizer.path", f"{cfg_file} is not valid JSON: {e}") from e
            self._files.append(cfg_file)
        names = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
        ids: dict[str, int | None] = {}
        for role, explicit in names.items():
            if explicit:
                ids[role] = self._lookup(explicit, f"tokenizer.{role}_token")
                continue
            ids[role] = None
            configured = _config_token(cfg.get(f"{role}_token"))
            for cand in ((configured,) if configured else ()) + _GUESS[role]:
                if self.tok.token_to_id(cand) is not None:
                    ids[role] = self.tok.token_to_id(cand)
                    break
        if ids["eos"] is None:
            raise ConfigError("tokenizer.eos_token", f"no EOS token found in {file!r}; name it "
                              "explicitly (e.g. '<|im_end|>')")
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        self._vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        self.special_tokens = _special_tokens_map(cfg, {f"{r}_token": n for r, n in names.items() if n})
        self.chat_templates = self._load_templates(directory, cfg, cfg_file, chat_origin)

    def _load_templates(self, directory: str, cfg: dict, cfg_file: str, chat_origin: str | None) -> dict:
        sources: dict[str, tuple[str, str]] = {}  # name -> (template, origin)
        jinja = os.path.join(directory, TEMPLATE_FILE)
        extra_dir = os.path.join(directory, TEMPLATE_DIR)
        extra = sorted(n for n in os.listdir(extra_dir) if n.endswith(".jinja")) if os.path.isdir(extra_dir) else []
        # Template files take priority over tokenizer_config.json entries (as in transformers).
        for name, file in ([("default", jinja)] if os.path.isfile(jinja) else []) + [
                (n[:-len(".jinja")], os.path.join(extra_dir, n)) for n in extra]:
            with open(file, encoding="utf-8") as f:
                sources[name] = (f.read(), file)
            self._files.append(file)
        raw = cfg.get("chat_template")
        if not sources and isinstance(raw, str):
            sources["default"] = (raw, f"{cfg_file}:chat_template")
        elif not sources and isinstance(raw, list):
            for i, entry in enumerate(raw):
                if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                        and isinstance(entry.get("template"), str)):
                    raise ChatTemplateError(f"{cfg_file}:chat_template[{i}]", "must be {'name': str, 'template': str}")
                sources[entry["name"]] = (entry["template"], f"{cfg_file}:chat_template[{entry['name']}]")
        elif not sources and raw is not None:
            raise ChatTemplateError(f"{cfg_file}:chat_template", f"must be a string or a list of named "
                                    f"templates, got {type(raw).__name__}")
        return {name: ChatTemplate(text, chat_origin or origin, self.special_tokens)
                for name, (text, origin) in sources.items()}

    def files(self) -> dict[str, bytes]:
        """The files this tokenizer was built from, by path relative to its directory: what
        reconstructs it elsewhere (tokenizer.json, tokenizer_config.json, template files)."""
        root = os.path.dirname(self.path)
        out = {}
        for file in self._files:
            with open(file, "rb") as f:
                out[os.path.relpath(file, root).replace(os.sep, "/")] = f.read()
        return out

    def _lookup(self, token: str, field: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ConfigError(field, f"token {token!r} is not in {self.path!r}")
        return i

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in {self.path!r}")
        return i

    def id_to_token(self, token_id: int) -> str:
        tok = self.tok.id_to_token(int(token_id))
        if tok is None:
            raise KeyError(f"id {token_id} is out of range for {self.path!r}")
        return tok
