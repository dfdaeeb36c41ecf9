"""The one tokenizer interface every role uses."""

from __future__ import annotations

import abc
from collections.abc import Sequence


def render_template(template: str, prompt: str, system: str = "") -> str:
    """Substitutes {prompt} (and {system}) literally: other braces (LaTeX) are left alone."""
    return template.replace("{system}", system).replace("{prompt}", prompt)


class Tokenizer(abc.ABC):
    """Text <-> token ids, the special ids, and the prompt template from config.tokenizer.

    bos_id may be None for tokenizers that have no BOS token (some HF models); eos_id and pad_id
    are always usable ids (pad falls back to eos, never -1).
    """

    bos_id: int | None
    eos_id: int
    pad_id: int
    prompt_template: str = "{prompt}"
    system_prompt: str = ""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id encode() returns is below it."""

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def _decode(self, ids: list[int], skip_special: bool) -> str: ...

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int:
        """Id of a token string (e.g. '</s>', '<|im_end|>'); KeyError naming it if absent."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str: ...

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of text; add_bos is a no-op when the tokenizer has no BOS token."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._encode(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ids. Ids outside [0, vocab_size) (e.g. from a padded embedding) are dropped."""
        clean = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._decode(clean, skip_special)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None)

    def apply_template(self, prompt: str) -> str:
        """The model input text for a task prompt (config.tokenizer.prompt_template)."""
        return render_template(self.prompt_template, prompt, self.system_prompt)

    def encode_prompt(self, prompt: str) -> list[int]:
        """The model input ids for a task prompt: what every role feeds the model."""
        return self.encode(self.apply_template(prompt), add_bos=self.bos_id is not None)
