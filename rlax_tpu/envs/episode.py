"""Episode tokens: one token sequence per episode, nothing re-tokenized.

    renderer = EnvTurnRenderer(tokenizer, tools=env.tool_schemas() or None)
    messages = env.reset(problem)
    ep = Episode(renderer, episode_prompt(tokenizer, messages, tools=...), messages)
    ep.add_model_turn(completion.tokens, completion.logprobs)      # as sampled: loss mask 1
    new_messages, reward, done, info = env.step(ep.last_turn_text)
    delta = ep.add_env_turn(new_messages)                          # rendered once: loss mask 0
    ...                                                            # engine.extend(..., delta)
    ep.tokens, ep.logprobs, ep.loss_mask                           # everything after the prompt
    ep.mismatches()                                                # vs a fresh render + encode

Model tokens are kept exactly as the engine sampled them, with their behavior log-probs. Each
environment turn is the chat template's delta after the model's turn: render(history + new
messages, generation prompt) minus render(history), plus whatever the template writes after the
model's end-of-turn token (ChatML's '\\n'), which the model never samples since generation stops at
that token. Decoding the model's tokens and encoding the text again can give other ids (BPE is not
injective), so a conversation re-tokenized each turn drifts from what the model saw;
``mismatches()`` measures that drift for a metric and never fails.

Templates that rewrite history (Qwen3 drops earlier turns' reasoning) break the prefix property
render(history) <= render(history + new). It is checked once per template on a probe
conversation; a template that fails it renders environment turns against a short stub history
(one user and one assistant message), and a render that fails it at run time does the same for
that turn (counted in ``delta_fallbacks``). SFT traces use the same class: ``add_model_turn``
takes a reference turn's text and encodes it once.
"""

from __future__ import annotations

import difflib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from rlax_tpu.tokenizer.base import Tokenizer

log = logging.getLogger(__name__)

Message = dict[str, Any]

# Stub history for templates that rewrite history: an assistant turn last, like a real one.
_STUB = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}]
_PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
          {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}]
_PROBE_NEW = ([{"role": "tool", "content": "T"}], [{"role": "user", "content": "V"}])
_PREFIX_CACHE: dict[tuple[str, str], bool] = {}
_CACHE_LOCK = threading.Lock()


class EpisodeError(ValueError):
    """An episode cannot be rendered as asked (no chat template, a template that keeps no prefix)."""


def prompt_messages(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[Message]:
    """An episode's first messages as the prompt renders them: a lone user message is a task
    prompt (config.tokenizer.system_prompt added, as tokenizer.encode_prompt does)."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return tokenizer.prompt_messages(str(messages[0]["content"]))
    return [dict(m) for m in messages]


def episode_prompt(tokenizer: Tokenizer, messages: Sequence[Message], tools: Sequence[dict] | None = None
                   ) -> list[int]:
    """The prompt ids of an episode's first messages (env.reset): a lone user message is rendered
    as every task prompt is (tokenizer.encode_prompt of its text: system prompt and
    prompt_template included), anything else with the chat template and its generation prompt."""
    if len(messages) == 1 and messages[0].get("role") == "user" and not tools:
        return tokenizer.encode_prompt(str(messages[0]["content"]))
    if tokenizer.chat_template is None:
        raise EpisodeError(f"{tokenizer._describe()}: a multi-turn environment needs a chat template "
                           "(config.tokenizer.use_chat_template and a tokenizer that has one)")
    return tokenizer.encode_prompt(list(messages), tools=tools)


class EnvTurnRenderer:
    """Renders environment turns as token deltas with a tokenizer's chat template.

    ``tools``: JSON schemas passed to templates that take them (as for the prompt). A tokenizer
    without a chat template gets a renderer that can only check one-step episodes.
    """

    def __init__(self, tokenizer: Tokenizer, tools: Sequence[dict] | None = None):
        self.tokenizer = tokenizer
        self.tools = list(tools) if tools else None
        self.template = tokenizer.chat_template
        self._keeps_prefix: bool | None = None

    @property
    def keeps_prefix(self) -> bool:
        """Whether the template keeps the prefix property (probed at the first environment turn,
        so one-step episodes never render a probe)."""
        if self._keeps_prefix is None:
            self._keeps_prefix = self.template is not None and self._prefix_property()
        return self._keeps_prefix

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        if self.template is None:
            raise EpisodeError(f"{self.tokenizer._describe()}: environment turns need a chat template")
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, tools=self.tools)

    def _is_prefix(self, history: Sequence[Message], new: Sequence[Message]) -> bool:
        return self.render([*history, *new], True).startswith(self.render(history, False))

    def _prefix_property(self) -> bool:
        key = (self.template.source, json.dumps(self.tools, sort_keys=True, default=str))
        with _CACHE_LOCK:
            if key not in _PREFIX_CACHE:
                ok = all(self._is_prefix(_PROBE, new) for new in _PROBE_NEW)
                if not ok:
                    log.warning("chat template %s rewrites history (render(history) is not a prefix of "
                                "render(history + new turn)): environment turns are rendered against a "
                                "stub history", self.template.origin)
                    if not all(self._is_prefix(_STUB, new) for new in _PROBE_NEW):
                        raise EpisodeError(f"chat template {self.template.origin}: not even a short "
                                           "conversation renders as a prefix of its continuation; it "
                                           "cannot render environment turns as deltas")
                _PREFIX_CACHE[key] = ok
            return _PREFIX_CACHE[key]

    def delta_text(self, history: Sequence[Message], new_messages: Sequence[Message], end_of_turn: str
                   ) -> tuple[str, bool]:
        """(the text after the model's turn that the template writes for ``new_messages`` and the
        next generation prompt, whether the stub history was used). ``history`` ends with the
        model's turn; ``end_of_turn`` is the text of the token that ended it ('' if none)."""
        used_stub = not self.keeps_prefix
        base = list(_STUB if used_stub else history)
        before, after = self.render(base, False), self.render([*base, *new_messages], True)
        if not after.startswith(before) and not used_stub:
            used_stub, base = True, list(_STUB)
            before, after = self.render(base, False), self.render([*base, *new_messages], True)
        if not after.startswith(before):
            raise EpisodeError(f"chat template {self.template.origin}: render(history) is not a prefix of "
                               "render(history + environment turn)")
        # What the template writes after the end-of-turn token belongs to the environment's delta.
        cut = before.rfind(end_of_turn) if end_of_turn else -1
        suffix = before[cut + len(end_of_turn):] if cut >= 0 else ""
        return suffix + after[len(before):], used_stub


class Episode:
    """One episode's tokens after its prompt, their behavior log-probs and loss mask (model
    tokens 1, environment tokens 0), and the conversation as messages."""

    def __init__(self, renderer: EnvTurnRenderer, prompt: Sequence[int], messages: Sequence[Message]):
        """``prompt``: the prompt's ids (episode_prompt); ``messages``: the conversation they
        render (the environment's reset messages)."""
        self.renderer = renderer
        self.prompt = [int(t) for t in prompt]
        self.messages: list[Message] = prompt_messages(renderer.tokenizer, messages)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.loss_mask: list[int] = []
        self.model_turns: list[tuple[int, int]] = []  # [start, end) of each model turn in tokens
        self.delta_fallbacks = 0
        self._end_of_turn = ""

    @property
    def tokenizer(self) -> Tokenizer:
        return self.renderer.tokenizer

    @property
    def last_turn_text(self) -> str:
        """The last model turn as text (special tokens dropped): what the environment reads."""
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else ""

    @property
    def last_turn_tokens(self) -> int:
        """How many tokens the last model turn has."""
        return self.model_turns[-1][1] - self.model_turns[-1][0] if self.model_turns else 0

    @property
    def num_model_tokens(self) -> int:
        return int(sum(self.loss_mask))

    def add_model_turn(self, tokens: Sequence[int] | None = None, logprobs: Sequence[float] | None = None, *,
                       text: str | None = None) -> list[int]:
        """Appends a model turn: sampled ``tokens`` (ending with the stop token when the turn ended
        on one) with their ``logprobs``, kept as they are; or a reference turn's ``text`` (SFT),
        encoded once and closed with the tokenizer's EOS, log-probs 0. Returns its tokens."""
        tok = self.tokenizer
        if tokens is None:
            if text is None:
                raise ValueError("add_model_turn needs tokens or text")
            tokens = tok.encode(text) + [tok.eos_id]
        tokens = [int(t) for t in tokens]
        logprobs = [0.0] * len(tokens) if logprobs is None else [float(x) for x in logprobs]
        if len(logprobs) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(logprobs)} log-probs")
        ends = bool(tokens) and tokens[-1] in tok.special_ids
        self._end_of_turn = tok.decode(tokens[-1:], skip_special=False) if ends else ""
        start = len(self.tokens)
        self.tokens += tokens
        self.logprobs += logprobs
        self.loss_mask += [1] * len(tokens)
        self.model_turns.append((start, len(self.tokens)))
        content = tok.decode(tokens[:-1] if ends else tokens) if text is None else text
        self.messages.append({"role": "assistant", "content": content})
        return tokens

    def add_env_turn(self, new_messages: Sequence[Message], max_len: int | None = None) -> list[int] | None:
        """Appends the environment's messages rendered once as the template's delta after the
        model's last turn (through the next generation prompt); loss mask 0, log-prob 0. Returns
        the delta's tokens (what the engine prefills for the next turn), or None, appending
        nothing, when the episode would then be longer than ``max_len`` tokens."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise EpisodeError("an environment turn follows a model turn")
        text, stub = self.renderer.delta_text(self.messages, new_messages, self._end_of_turn)
        delta = self.tokenizer.encode(text)
        if max_len is not None and len(self.tokens) + len(delta) > max_len:
            return None
        self.delta_fallbacks += int(stub and self.renderer.keeps_prefix)
        self.tokens += delta
        self.logprobs += [0.0] * len(delta)
        self.loss_mask += [0] * len(delta)
        self.messages += [dict(m) for m in new_messages]
        return delta

    def fresh_tokens(self) -> list[int]:
        """The whole conversation rendered and encoded afresh (what re-tokenizing each turn
        gives), cut after the last model turn. Without a chat template (one-step episodes): the
        prompt, then each model turn decoded and encoded again (its stop token kept)."""
        tok = self.tokenizer
        if self.renderer.template is None:
            fresh, at = list(self.prompt), 0
            for start, end in self.model_turns:
                turn = self.tokens[start:end]
                stop = turn[-1:] if turn and turn[-1] in tok.special_ids else []
                fresh += self.tokens[at:start] + tok.encode(tok.decode(turn[: len(turn) - len(stop)])) + stop
                at = end
            return fresh + self.tokens[at:]
        text = self.renderer.render(self.messages, False)
        if self._end_of_turn and text.rfind(self._end_of_turn) >= 0:
            text = text[: text.rfind(self._end_of_turn) + len(self._end_of_turn)]
        return tok.encode(text)

    def mismatches(self) -> int:
        """Tokens where the kept sequence (prompt + episode) and fresh_tokens() differ: per block
        of difference the longer side's length; 0 when they agree. Never raises: a render that
        fails counts every kept token; a fresh render longer at the end only is no mismatch."""
        kept = self.prompt + self.tokens
        try:
            fresh = self.fresh_tokens()
        except Exception as e:  # noqa: BLE001 - a metric, never a failed rollout
            log.warning("episode check: the conversation could not be rendered again: %s", e)
            return len(kept)
        ops = difflib.SequenceMatcher(None, kept, fresh, autojunk=False).get_opcodes()
        if ops and ops[-1][0] == "insert" and ops[-1][1] == len(kept):
            ops = ops[:-1]  # the template closing a last turn cut short (no end-of-turn sampled)
        return int(sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal"))

    def counters(self) -> dict[str, int]:
        """The episode's token counters for reward_details."""
        return {"episode_tokens": len(self.tokens), "model_tokens": self.num_model_tokens,
                "env_tokens": len(self.tokens) - self.num_model_tokens, "token_mismatches": self.mismatches(),
                "delta_fallbacks": self.delta_fallbacks}


def check_messages(messages: Any) -> list[Message]:
    """An environment's messages as a list of {'role', 'content'} dicts (a clear error otherwise)."""
    if not isinstance(messages, Sequence) or not all(isinstance(m, Mapping) and "role" in m for m in messages):
        raise EpisodeError(f"environment messages must be a list of {{'role', 'content'}} dicts, got {messages!r}")
    return [dict(m) for m in messages]
