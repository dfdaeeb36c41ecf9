"""tokenizer.build(config.tokenizer, workdir, corpus) -> Tokenizer."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

import ml_collections

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.tokenizer.base import Tokenizer, render_template
from rlax_tpu.tokenizer.spm import SentencePieceTokenizer, train_sentencepiece

TRAINED_RELPATH = os.path.join("tokenizer", "spm.model")
KINDS = ("sentencepiece", "hf", "gguf", "train")
GGUF_RELDIR = os.path.join("tokenizer", "gguf")


def trained_path(workdir: str) -> str:
    return os.path.join(workdir, TRAINED_RELPATH)


def gguf_dir(workdir: str) -> str:
    """Where kind 'gguf' writes the converted tokenizer.json + tokenizer_config.json."""
    return os.path.join(workdir, GGUF_RELDIR)


def build(config, workdir: str | None = None, corpus: Iterable[str] | None = None) -> Tokenizer:
    """Builds the tokenizer described by config.tokenizer.

    kind 'sentencepiece': loads config.tokenizer.path (.model). kind 'hf': loads a tokenizer.json
    (needs the `tokenizers` package) with its chat template. kind 'gguf': converts the tokenizer
    and chat template in a .gguf file into tokenizer.json + tokenizer_config.json under
    <workdir>/tokenizer/gguf/ (a temporary directory without a workdir) and loads those. kind
    'train': reuses <workdir>/tokenizer/spm.model if it exists, else trains a BPE model on corpus
    (e.g. task.corpus()) plus the template text and writes it there atomically, so a resumed run
    gets the identical tokenizer.
    """
    c = config.tokenizer if "tokenizer" in config and "kind" not in config else config
    if c is not config:  # the whole config: an empty path may name the model's checkpoint
        from rlax_tpu.config.sections.tokenizer import tokenizer_path

        c = ml_collections.ConfigDict({**c.to_dict(), "path": tokenizer_path(config)})
    template, system = c.prompt_template, c.system_prompt
    use_chat = bool(c.use_chat_template)
    if c.kind == "sentencepiece":
        if not c.path or not os.path.isfile(c.path):
            raise ConfigError("tokenizer.path", f"sentencepiece model file not found: {c.path!r}")
        return SentencePieceTokenizer(c.path, template, system)
    if c.kind == "hf":
        from rlax_tpu.tokenizer.hf import HFTokenizer

        if not c.path or not os.path.exists(c.path):
            raise ConfigError("tokenizer.path", f"Hugging Face tokenizer file not found: {c.path!r}")
        return HFTokenizer(c.path, c.bos_token, c.eos_token, c.pad_token, template, system, use_chat)
    if c.kind == "gguf":
        from rlax_tpu.tokenizer.gguf_convert import GGUFError, convert_gguf
        from rlax_tpu.tokenizer.hf import HFTokenizer

        if not c.path or not os.path.isfile(c.path):
            raise ConfigError("tokenizer.path", f"GGUF file not found: {c.path!r}")
        try:
            json_file = convert_gguf(c.path, gguf_dir(workdir) if workdir else None)
        except GGUFError as e:
            raise ConfigError("tokenizer.path", str(e)) from e
        return HFTokenizer(json_file, c.bos_token, c.eos_token, c.pad_token, template, system, use_chat,
                           chat_origin=f"{c.path}:tokenizer.chat_template")
    if c.kind == "train":
        if not workdir:
            raise ConfigError("tokenizer.kind", "'train' needs a workdir to keep the trained model in")
        path = trained_path(workdir)
        if not os.path.isfile(path):
            if corpus is None:
                raise ConfigError("tokenizer.kind", f"'train' needs a corpus (e.g. task.corpus()) "
                                  f"and {path!r} does not exist yet")
            # The template's own text (e.g. chat markers) belongs in the vocabulary too.
            frame = render_template(template, "", system)
            train_sentencepiece(itertools.chain([frame] if frame.strip() else [], corpus), path,
                                int(c.vocab_size))
        return SentencePieceTokenizer(path, template, system)
    raise ConfigError("tokenizer.kind", f"must be one of {KINDS}, got {c.kind!r}")
