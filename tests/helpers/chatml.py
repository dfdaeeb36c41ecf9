"""A tiny byte-level BPE tokenizer with a ChatML chat template (SmolLM2's form), built in the test."""

from __future__ import annotations

import json
import os

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")

CORPUS = ["What is 12 * 34? Use the python tool.", "<tool_call>{\"name\": \"python\", \"arguments\": "
          "{\"code\": \"print(12 * 34)\"}}</tool_call>", "408", "The answer is #### 408", "lookup the capital",
          "Pantom Pan tom Pantomime", "hello world, hello there"]


def chatml_tokenizer(directory: str, template: str = CHATML, vocab_size: int = 400):
    """An HFTokenizer whose EOS is <|im_end|> (ChatML's end of turn), trained on a small corpus."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    from rlax_tpu.tokenizer.hf import HFTokenizer

    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                   "chat_template": template}, f)
    return HFTokenizer(os.path.join(directory, "tokenizer.json"))
