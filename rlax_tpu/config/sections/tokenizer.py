"""config.tokenizer: which tokenizer, and the prompt template."""

import ml_collections

from rlax_tpu.config.sections._checks import one_of, positive, require

SECTION = "tokenizer"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # 'sentencepiece' (a .model file), 'hf' (a tokenizer.json, or a directory holding one; needs
    # tokenizers), or 'train' (train a sentencepiece BPE model on the task's corpus into
    # <workdir>/tokenizer/spm.model; an existing file there is reused, so a resumed run gets the
    # identical tokenizer).
    c.kind = "train"
    # Path to the tokenizer file for 'sentencepiece' / 'hf'.
    c.path = ""
    # Vocabulary size when kind == 'train' (an upper bound: a small corpus may give fewer pieces;
    # read Tokenizer.vocab_size). Must exceed 300 for byte fallback (256 byte pieces + specials).
    c.vocab_size = 512
    # Prompt template; the literal text {prompt} is replaced by the task's question (no other
    # braces are interpreted, so LaTeX like \boxed{} is safe). Also usable as a chat template,
    # e.g. "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n".
    c.prompt_template = "{prompt}\n"
    # Optional system prompt; when set, template text {system} is replaced by it.
    c.system_prompt = ""
    # Hugging Face tokenizers only: special token strings. '' = read tokenizer_config.json next
    # to tokenizer.json, else guess common names. pad falls back to eos (never -1).
    c.bos_token = ""
    c.eos_token = ""
    c.pad_token = ""
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    one_of(SECTION, c, "kind", ("sentencepiece", "hf", "train"))
    if c.kind in ("sentencepiece", "hf"):
        require(bool(c.path), "tokenizer.path", f"is required when tokenizer.kind={c.kind!r}")
    positive(SECTION, c, "vocab_size")
    if c.kind == "train":
        require(c.vocab_size > 300, "tokenizer.vocab_size",
                f"must be > 300 for kind='train' (byte fallback needs 256 byte pieces), got {c.vocab_size}")
    require(isinstance(c.prompt_template, str) and "{prompt}" in c.prompt_template,
            "tokenizer.prompt_template", "must contain the placeholder {prompt}")
    require(isinstance(c.system_prompt, str), "tokenizer.system_prompt", "must be a string")
    for name in ("bos_token", "eos_token", "pad_token"):
        require(isinstance(c[name], str), f"tokenizer.{name}", "must be a string ('' = automatic)")
