"""The one tokenizer interface every role uses."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from rlax_tpu.tokenizer.chat import ChatTemplate, ChatTemplateError, pick_template

Messages = Sequence[Mapping[str, Any]]
Tools = Sequence[Mapping[str, Any] | Callable] | None


def render_template(template: str, prompt: str, system: str = "") -> str:
    """Substitutes {prompt} (and {system}) literally: other braces (LaTeX) are left alone."""
    return template.replace("{system}", system).replace("{prompt}", prompt)


class Tokenizer(abc.ABC):
    """Text <-> token ids, the special ids, and how a task prompt becomes model input.

    bos_id may be None for tokenizers that have no BOS token (some HF models); eos_id and pad_id
    are always usable ids (pad falls back to eos, never -1). A tokenizer that carries the model's
    chat template (chat_templates, from tokenizer_config.json / chat_template.jinja / a GGUF)
    renders prompts with it; one without uses config.tokenizer.prompt_template.
    """

    bos_id: int | None
    eos_id: int
    pad_id: int
    prompt_template: str = "{prompt}"
    system_prompt: str = ""
    # The tokenizer's own chat templates by name (a single one is 'default'); empty if it has none.
    chat_templates: Mapping[str, ChatTemplate] = MappingProxyType({})
    # config.tokenizer.use_chat_template: False renders prompts with prompt_template even when a
    # chat template exists.
    use_chat_template: bool = True

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

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The chat template prompts are rendered with; None without one or when it is switched off."""
        if not self.use_chat_template or not self.chat_templates:
            return None
        return pick_template(self.chat_templates, where=self._describe())

    def _describe(self) -> str:
        return getattr(self, "path", None) or type(self).__name__

    def apply_chat_template(self, messages: Messages, *, add_generation_prompt: bool = True, tools: Tools = None,
                            documents: Sequence[Mapping[str, Any]] | None = None, **template_vars: Any) -> str:
        """The conversation rendered with the tokenizer's chat template, as transformers'
        apply_chat_template(messages, tokenize=False, ...) renders it. Tools are JSON schema dicts
        or typed Python functions with Google-style docstrings; template_vars (e.g.
        enable_thinking=False) become template variables."""
        if not self.chat_templates:
            raise ChatTemplateError(self._describe(), "this tokenizer has no chat template")
        template = pick_template(self.chat_templates, tools, where=self._describe())
        return template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                               documents=documents, **template_vars)

    def encode_chat(self, messages: Messages, *, add_generation_prompt: bool = True, tools: Tools = None,
                    documents: Sequence[Mapping[str, Any]] | None = None, **template_vars: Any) -> list[int]:
        """Token ids of the rendered conversation. No BOS is added: the template writes any BOS
        token itself (transformers' apply_chat_template(..., tokenize=True) does the same). Text
        the model generated is re-tokenized here: to continue a rollout, append its own ids."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    tools=tools, documents=documents, **template_vars))

    def prompt_messages(self, prompt: str) -> list[dict[str, str]]:
        """A task prompt as a conversation: config.tokenizer.system_prompt (if set), then the user."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": prompt}]

    def apply_template(self, prompt: str) -> str:
        """The model input text for a task prompt: the chat template (system prompt, user turn,
        generation prompt) when there is one, else config.tokenizer.prompt_template."""
        if self.chat_template is not None:
            return self.chat_template.render(self.prompt_messages(prompt), add_generation_prompt=True)
        return render_template(self.prompt_template, prompt, self.system_prompt)

    def encode_prompt(self, prompt: str | Messages, *, tools: Tools = None) -> list[int]:
        """Model input ids for a task prompt (a string, or a conversation so far); every role uses
        this. With a chat template: the rendered conversation plus the generation prompt, BOS only
        where the template writes it. Without: prompt_template, after a BOS (once: not again when
        the template text already starts with it)."""
        if self.chat_template is not None:
            messages = self.prompt_messages(prompt) if isinstance(prompt, str) else prompt
            return self.encode_chat(messages, add_generation_prompt=True, tools=tools)
        if not isinstance(prompt, str) or tools is not None:
            raise ValueError(f"{self._describe()} has no chat template (or config.tokenizer.use_chat_template "
                             "is False): config.tokenizer.prompt_template takes a single prompt string, no "
                             "conversation or tools")
        ids = self.encode(render_template(self.prompt_template, prompt, self.system_prompt))
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids
