"""One token sequence per episode: the prompt, each model turn's tokens as given, and each
environment turn rendered once by the chat template as the delta after the model's turn.

    ep = EpisodeTokens(tok, env.reset(problem), tools=env.tool_schemas())
    ep.add_model(ids)                       # the model's tokens, ending with its end-of-turn token
    ep.add_env(new_messages)                # the tool replies and the next generation prompt
    ep.tokens, ep.loss_mask                 # 1 on model tokens, 0 on prompt and environment tokens

Earlier turns are never re-tokenized: BPE is not injective, so decoding a model turn and
encoding it again may give other ids. The delta of an environment turn is the text after the
model's end-of-turn token in the render of the conversation with the environment's messages and
the generation prompt (the template's newline after the end-of-turn token belongs to it, not to
the model's turn). A template that rewrites earlier turns (drops them, reorders them) has no such
delta: EpisodeError names it. ``mismatches()`` compares the kept tokens with a fresh render of
the whole conversation (a count for a metric, not a failure).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rlax_tpu.tokenizer.base import Tokenizer, Tools


class EpisodeError(ValueError):
    """The chat template does not extend the conversation rendered so far."""


class EpisodeTokens:
    """The token sequence of one episode, built turn by turn."""

    def __init__(self, tok: Tokenizer, messages: Sequence[Mapping[str, Any]], tools: Tools = None):
        self.tok, self.tools = tok, (list(tools) if tools else None)
        self.messages: list[dict] = [dict(m) for m in messages]
        self.tokens: list[int] = tok.encode_prompt(self.messages, tools=self.tools)
        self.loss_mask: list[int] = [0] * len(self.tokens)
        self.prompt_len = len(self.tokens)
        self._end_text = tok.decode([tok.eos_id], skip_special=False)

    def _render(self, generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(self.messages, add_generation_prompt=generation_prompt, tools=self.tools)

    def add_model(self, ids: Sequence[int], text: str | None = None) -> None:
        """A model turn: its tokens as sampled (the end-of-turn token included when it stopped
        there); text is the turn's content in the conversation (default: the decoded ids
        without special tokens)."""
        ids = [int(t) for t in ids]
        self.tokens += ids
        self.loss_mask += [1] * len(ids)
        content = text if text is not None else self.tok.decode(ids, skip_special=True)
        self.messages.append({"role": "assistant", "content": content})

    def add_model_text(self, text: str) -> None:
        """A model turn given as text (SFT data, scripted turns): encoded once, plus end-of-turn."""
        self.add_model(self.tok.encode(text) + [self.tok.eos_id], text=text)

    def add_env(self, new_messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The environment's messages after a model turn, with the next generation prompt, as
        tokens appended with loss mask 0; returns them (what the engine extends the episode by)."""
        before = self._render(generation_prompt=False)
        content = self.messages[-1]["content"]
        at = before.rfind(content + self._end_text) if content else before.rfind(self._end_text)
        if self.messages[-1]["role"] != "assistant" or at < 0:
            raise EpisodeError(f"{self.tok.chat_template}: the last model turn does not end with "
                               f"{self._end_text!r} in the rendered conversation")
        cut = at + len(content) + len(self._end_text)
        self.messages += [dict(m) for m in new_messages]
        after = self._render(generation_prompt=True)
        if not after.startswith(before[:cut]):
            raise EpisodeError(f"{self.tok.chat_template}: rendering the environment's turn rewrites the "
                               "conversation before it (no delta to append)")
        delta = self.tok.encode(after[cut:])
        self.tokens += delta
        self.loss_mask += [0] * len(delta)
        return delta

    def mismatches(self) -> int:
        """Positions where the kept tokens differ from a fresh encoding of the whole conversation
        (plus the length difference); 0 when re-tokenizing would give the same sequence."""
        fresh = self.tok.encode(self._render(generation_prompt=self.messages[-1]["role"] != "assistant"))
        kept = self.tokens
        if self.messages[-1]["role"] == "assistant":  # the render goes on past the end-of-turn token
            fresh = fresh[:len(kept)]
        n = min(len(fresh), len(kept))
        return sum(a != b for a, b in zip(fresh[:n], kept[:n], strict=True)) + abs(len(fresh) - len(kept))
