"""config.tokenizer: which tokenizer, and how a task prompt becomes model input."""

import ml_collections

from rlax_tpu.config.sections._checks import one_of, positive, require

SECTION = "tokenizer"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # 'sentencepiece' (a .model file), 'hf' (a tokenizer.json, or a directory holding one, with
    # tokenizer_config.json / chat_template.jinja beside it), 'gguf' (the tokenizer and chat
    # template inside a .gguf checkpoint, converted into tokenizer.json + tokenizer_config.json
    # under <workdir>/tokenizer/gguf/), or 'train' (train a sentencepiece BPE model on the task's
    # corpus into <workdir>/tokenizer/spm.model; an existing file there is reused, so a resumed run
    # gets the identical tokenizer).
    c.kind = "train"
    # Path to the tokenizer file for 'sentencepiece' / 'hf' / 'gguf' (the .gguf file); '' for
    # 'hf' / 'gguf' = the model's own checkpoint (model.hf_path).
    c.path = ""
    # Vocabulary size when kind == 'train' (an upper bound: a small corpus may give fewer pieces;
    # read Tokenizer.vocab_size). Must exceed 300 for byte fallback (256 byte pieces + specials).
    c.vocab_size = 512
    # True: a tokenizer that carries the model's chat template ('hf' with a chat_template, 'gguf'
    # with tokenizer.chat_template) renders each task prompt with it, as transformers'
    # apply_chat_template(..., add_generation_prompt=True) does: [system_prompt as a system
    # message, if set] + the prompt as the user message, BOS only where the template writes it.
    # False, or a tokenizer without one: prompt_template below.
    c.use_chat_template = True
    # Prompt template when no chat template is used; the literal text {prompt} is replaced by the
    # task's question (no other braces are interpreted, so LaTeX like \boxed{} is safe), and a
    # BOS token (if the tokenizer has one) goes first. Also usable as a hand-written chat format,
    # e.g. "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n".
    c.prompt_template = "{prompt}\n"
    # Optional system prompt: the system message of the chat template, else the replacement of
    # {system} in prompt_template.
    c.system_prompt = ""
    # Hugging Face and GGUF tokenizers only: special token strings. '' = read
    # tokenizer_config.json next to tokenizer.json (for 'gguf': the file's bos/eos/padding token
    # ids), else guess common names. pad falls back to eos (never -1).
    c.bos_token = ""
    c.eos_token = ""
    c.pad_token = ""
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    one_of(SECTION, c, "kind", ("sentencepiece", "hf", "gguf", "train"))
    path = tokenizer_path(config)
    if c.kind in ("sentencepiece", "hf", "gguf"):
        require(isinstance(path, str) and bool(path), "tokenizer.path",
                f"is required when tokenizer.kind={c.kind!r}" + ("" if c.kind == "sentencepiece" else
                                                                   " and model.hf_path is not set"))
    if c.kind == "gguf":
        require(path.endswith(".gguf"), "tokenizer.path", f"must name a .gguf file for kind='gguf', got {path!r}")
    positive(SECTION, c, "vocab_size")
    if c.kind == "train":
        require(c.vocab_size > 300, "tokenizer.vocab_size",
                f"must be > 300 for kind='train' (byte fallback needs 256 byte pieces), got {c.vocab_size}")
    require(isinstance(c.prompt_template, str) and "{prompt}" in c.prompt_template,
            "tokenizer.prompt_template", "must contain the placeholder {prompt}")
    require(isinstance(c.system_prompt, str), "tokenizer.system_prompt", "must be a string")
    require(isinstance(c.use_chat_template, bool), "tokenizer.use_chat_template",
            f"must be True or False, got {c.use_chat_template!r}")
    for name in ("bos_token", "eos_token", "pad_token"):
        require(isinstance(c[name], str), f"tokenizer.{name}", "must be a string ('' = automatic)")


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
    """tokenizer.path, or for 'hf' / 'gguf' the model's checkpoint when it is ''."""
    c = config.tokenizer
    if not c.path and c.kind in ("hf", "gguf") and "model" in config:
        return config.model.hf_path
    return c.path
