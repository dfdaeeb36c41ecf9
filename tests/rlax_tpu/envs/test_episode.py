"""Episode tokens: model tokens kept as sampled, environment turns rendered once as the chat
template's delta (its newline after the end-of-turn token included), the re-tokenization check,
and templates that rewrite history."""

from __future__ import annotations

import pytest

from rlax_tpu.envs.episode import EnvTurnRenderer, Episode, EpisodeError, episode_prompt
from tests.helpers.chatml import CHATML, chatml_tokenizer

# Qwen3-style: reasoning of assistant turns before the last user message is dropped.
DROPS_THINK = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and loop.index0 < ns.last and '</think>' in c %}"
    "{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

MESSAGES = [{"role": "system", "content": "You have a python tool."}, {"role": "user", "content": "What is 12 * 34?"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return chatml_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _turn(tok, text):
    return tok.encode(text) + [tok.eos_id]


def test_env_turn_is_the_template_delta_after_the_end_of_turn_token(tok):
    ep = Episode(EnvTurnRenderer(tok), episode_prompt(tok, MESSAGES), MESSAGES)
    call = _turn(tok, '<tool_call>{"name": "python", "arguments": {"code": "print(12 * 34)"}}</tool_call>')
    ep.add_model_turn(call, [-0.25] * len(call))
    delta = ep.add_env_turn([{"role": "tool", "content": "408"}])
    # The newline after <|im_end|> is the environment's, then the tool turn and the next header.
    assert tok.decode(delta, skip_special=False) == "\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n"
    answer = _turn(tok, "The answer is #### 408")
    ep.add_model_turn(answer, [-0.5] * len(answer))
    assert ep.tokens == call + delta + answer
    assert ep.loss_mask == [1] * len(call) + [0] * len(delta) + [1] * len(answer)
    assert ep.logprobs == [-0.25] * len(call) + [0.0] * len(delta) + [-0.5] * len(answer)
    assert ep.model_turns == [(0, len(call)), (len(call) + len(delta), len(ep.tokens))]
    # Nothing drifted: a fresh render of the whole conversation gives the same ids.
    assert ep.fresh_tokens() == ep.prompt + ep.tokens
    assert ep.counters() == {"episode_tokens": len(ep.tokens), "model_tokens": len(call) + len(answer),
                             "env_tokens": len(delta), "token_mismatches": 0, "delta_fallbacks": 0}


def test_sampled_ids_are_kept_where_reencoding_the_text_gives_others(tok):
    pan, tom = tok.encode("Pan"), tok.encode("tom")
    whole = tok.encode("Pantom")
    assert tok.decode(pan + tom) == "Pantom" and whole != pan + tom  # BPE is not injective
    ep = Episode(EnvTurnRenderer(tok), episode_prompt(tok, MESSAGES), MESSAGES)
    sampled = pan + tom + [tok.eos_id]
    ep.add_model_turn(sampled, [-1.0] * len(sampled))
    delta = ep.add_env_turn([{"role": "user", "content": "again"}])
    ep.add_model_turn(sampled, [-1.0] * len(sampled))
    assert ep.tokens == sampled + delta + sampled  # the sampled ids, not the re-encoded ones
    fresh = ep.fresh_tokens()
    assert fresh != ep.prompt + ep.tokens
    assert ep.mismatches() == 2 * max(len(pan + tom), len(whole))  # counted, never raised


def test_reference_turn_text_is_encoded_once_and_closed_with_eos(tok):
    ep = Episode(EnvTurnRenderer(tok), episode_prompt(tok, MESSAGES), MESSAGES)
    out = ep.add_model_turn(text="The answer is #### 408")
    assert out == tok.encode("The answer is #### 408") + [tok.eos_id] and ep.logprobs == [0.0] * len(out)
    assert ep.last_turn_text == "The answer is #### 408" and ep.mismatches() == 0


def test_template_that_rewrites_history_falls_back_to_a_stub_history(tmp_path, caplog):
    tok = chatml_tokenizer(str(tmp_path), template=DROPS_THINK)
    renderer = EnvTurnRenderer(tok)
    assert not renderer.keeps_prefix and "rewrites history" in caplog.text
    ep = Episode(renderer, episode_prompt(tok, MESSAGES), MESSAGES)
    turn = _turn(tok, "<think>\nhm\n</think>\n\nhello")
    ep.add_model_turn(turn, None)
    delta = ep.add_env_turn([{"role": "user", "content": "again"}])
    # The delta is the same as the plain ChatML one: only the new turn and the next header.
    assert tok.decode(delta, skip_special=False) == "\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
    assert ep.tokens == turn + delta
    # Re-rendering the conversation drops the earlier reasoning: counted as mismatched tokens.
    ep.add_model_turn(_turn(tok, "ok"), None)
    assert ep.mismatches() > 0


def test_without_a_chat_template_multi_turn_prompts_and_env_turns_are_refused(tmp_path):
    tok = chatml_tokenizer(str(tmp_path), template=CHATML)
    tok.use_chat_template = False
    assert episode_prompt(tok, [{"role": "user", "content": "hi"}]) == tok.encode_prompt("hi")
    with pytest.raises(EpisodeError, match="chat template"):
        episode_prompt(tok, MESSAGES)
    ep = Episode(EnvTurnRenderer(tok), tok.encode_prompt("hi"), [{"role": "user", "content": "hi"}])
    ep.add_model_turn(_turn(tok, "hello"), None)
    assert ep.mismatches() == 0  # one-step: decoded and encoded again
    with pytest.raises(EpisodeError, match="chat template"):
        ep.add_env_turn([{"role": "tool", "content": "x"}])
