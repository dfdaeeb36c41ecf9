"""Tokenizers behind one interface: sentencepiece (.model, or trained in-process) and
Hugging Face tokenizer.json (the `hf` extra).

    tok = tokenizer.build(config.tokenizer, workdir, corpus=task.corpus())
    ids = tok.encode(tok.apply_template(problem.prompt), add_bos=True)
    text = tok.decode(completion_ids)
"""

from rlax_tpu.tokenizer.base import Tokenizer, render_template
from rlax_tpu.tokenizer.build import build, trained_path
from rlax_tpu.tokenizer.spm import SentencePieceTokenizer, train_sentencepiece, train_sentencepiece_bytes


def __getattr__(name):  # HFTokenizer imports lazily: `tokenizers` is an optional extra
    if name == "HFTokenizer":
        from rlax_tpu.tokenizer.hf import HFTokenizer

        return HFTokenizer
    raise AttributeError(name)


__all__ = [
    "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "build", "render_template",
    "train_sentencepiece", "train_sentencepiece_bytes", "trained_path",
]
