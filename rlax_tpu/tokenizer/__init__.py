"""Tokenizers behind one interface: sentencepiece (.model, or trained in-process), Hugging Face
tokenizer.json and the tokenizer inside a GGUF file, with the model's own chat template.

    tok = tokenizer.build(config.tokenizer, workdir, corpus=task.corpus())
    ids = tok.encode_prompt(problem.prompt)          # chat template, else prompt_template
    text = tok.apply_chat_template(messages, tools=[fn])
    text = tok.decode(completion_ids)
"""

from rlax_tpu.tokenizer.base import Tokenizer, render_template
from rlax_tpu.tokenizer.build import build, gguf_dir, trained_path
from rlax_tpu.tokenizer.chat import ChatTemplate, ChatTemplateError
from rlax_tpu.tokenizer.spm import SentencePieceTokenizer, train_sentencepiece, train_sentencepiece_bytes
from rlax_tpu.tokenizer.tool_schema import ToolSchemaError, get_json_schema


def __getattr__(name):  # HFTokenizer and the GGUF converter import `tokenizers` lazily
    if name == "HFTokenizer":
        from rlax_tpu.tokenizer.hf import HFTokenizer

        return HFTokenizer
    if name == "convert_gguf":
        from rlax_tpu.tokenizer.gguf_convert import convert_gguf

        return convert_gguf
    raise AttributeError(name)


__all__ = [
    "ChatTemplate", "ChatTemplateError", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "ToolSchemaError",
    "build", "convert_gguf", "get_json_schema", "gguf_dir", "render_template", "train_sentencepiece",
    "train_sentencepiece_bytes", "trained_path",
]
