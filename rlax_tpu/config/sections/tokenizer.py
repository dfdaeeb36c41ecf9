"""config.tokenizer: which tokenizer, and the prompt template."""

import ml_collections

from rlax_tpu.config.sections._checks import one_of, positive, require

SECTION = "tokenizer"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # 'sentencepiece' (a .model file), 'hf' (a tokenizer.json, needs the [hf] extra), or
    # 'train' (train a sentencepiece model on the task's corpus into the workdir).
    c.kind = "train"
    # Path to the tokenizer file for 'sentencepiece' / 'hf'.
    c.path = ""
    # Vocabulary size when kind == 'train'.
    c.vocab_size = 512
    # Prompt template; {prompt} is replaced by the task's question.
    c.prompt_template = "{prompt}"
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    one_of(SECTION, c, "kind", ("sentencepiece", "hf", "train"))
    if c.kind in ("sentencepiece", "hf"):
        require(bool(c.path), "tokenizer.path", f"is required when tokenizer.kind={c.kind!r}")
    positive(SECTION, c, "vocab_size")
    require("{prompt}" in c.prompt_template, "tokenizer.prompt_template",
            "must contain the placeholder {prompt}")
