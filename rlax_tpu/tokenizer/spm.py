"""sentencepiece tokenizers: loading a .model file and training one in-process."""

from __future__ import annotations

import io
import os
import string
import tempfile
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from rlax_tpu.tokenizer.base import Tokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MIN_VOCAB = 301  # 256 byte-fallback pieces + 4 specials + room for characters
# Every printable ASCII character gets its own piece even if the corpus lacks it (a digit the
# corpus never shows must still be one token, not a byte piece).
ALPHABET = string.digits + string.ascii_letters + string.punctuation + " "


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model. pad_id is the model's pad id, else eos (never -1)."""

    def __init__(self, model: str | bytes, prompt_template: str = "{prompt}", system_prompt: str = ""):
        if isinstance(model, bytes):
            self.sp = spm.SentencePieceProcessor(model_proto=model)
            self.path = None
        else:
            if not os.path.isfile(model):
                raise FileNotFoundError(f"sentencepiece model not found: {model!r}")
            self.sp = spm.SentencePieceProcessor(model_file=model)
            self.path = model
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"sentencepiece model {model if self.path else '<bytes>'} has no EOS id")
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self._vocab_size = self.sp.vocab_size()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            return self.sp.decode([i for i in ids if not self.sp.is_control(i)])
        # Render control tokens (<s>, </s>, <pad>) as their piece text between decoded runs.
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int:
        i = self.sp.piece_to_id(token)
        if self.sp.id_to_piece(i) != token:
            raise KeyError(f"token {token!r} is not in the sentencepiece vocabulary")
        return i

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))


def train_sentencepiece_bytes(corpus: Iterable[str], vocab_size: int) -> bytes:
    """Trains a BPE model on the texts; deterministic for a fixed corpus.

    Byte fallback (unseen characters become byte pieces, never UNK), digits split into single
    tokens (arithmetic needs it), every printable ASCII character in the vocabulary, identity
    normalization and no dummy prefix (exact round trip), newline as its own piece,
    and fixed special ids pad=0, unk=1, bos=2, eos=3. vocab_size is an upper bound: a small
    corpus yields fewer pieces.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} for byte fallback, got {vocab_size}")

    def sentences() -> Iterator[str]:
        yield ALPHABET
        n = 0
        for text in corpus:
            if text:
                n += 1
                yield text
        if n == 0:
            raise ValueError("cannot train a tokenizer on an empty corpus")

    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=writer, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, split_digits=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n"], character_coverage=1.0,
        num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, max_sentence_length=16384,
        minloglevel=2,
    )
    return writer.getvalue()


def train_sentencepiece(corpus: Iterable[str], path: str, vocab_size: int) -> str:
    """Trains (see train_sentencepiece_bytes) and writes the model atomically to path."""
    proto = train_sentencepiece_bytes(corpus, vocab_size)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".spm-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a crash never leaves a half-written model at path
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
