"""Hugging Face tokenizer.json files (the `hf` extra: the `tokenizers` package)."""

from __future__ import annotations

import json
import os

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.tokenizer.base import Tokenizer

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


class HFTokenizer(Tokenizer):
    """A tokenizers.Tokenizer from tokenizer.json (a file, or a directory holding one).

    Special tokens: explicit names win, then tokenizer_config.json next to the file, then common
    names. No BOS token -> bos_id None; no pad token -> pad_id = eos_id.
    """

    def __init__(self, path: str, bos_token: str = "", eos_token: str = "", pad_token: str = "",
                 prompt_template: str = "{prompt}", system_prompt: str = ""):
        tokenizers = _import_tokenizers()
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ConfigError("tokenizer.path", f"Hugging Face tokenizer file not found: {file!r}")
        self.path = file
        self.tok = tokenizers.Tokenizer.from_file(file)
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        cfg = {}
        cfg_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                cfg = json.load(f)
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
