"""Tokenizer: in-process sentencepiece training, build() kinds, HF tokenizer.json loading."""

import json
import os

import pytest

from rlax_tpu import tasks, tokenizer
from rlax_tpu.config import get_base_config
from rlax_tpu.config.errors import ConfigError

CORPUS = ["Compute: 3+4*2-5", "3+4*2-5=3+8-5=11-5=6\n#### 6", "Make 13 from 2 3 5",
          "5*2=10\n10+3=13\n#### 5*2+3", "Apply sort, reverse to 3 1 2"] * 20


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "spm.model")
    tokenizer.train_sentencepiece(iter(CORPUS), path, vocab_size=400)
    return tokenizer.SentencePieceTokenizer(path, prompt_template="Q: {prompt}\nA:")


def test_train_is_deterministic():
    a = tokenizer.train_sentencepiece_bytes(iter(CORPUS), 400)
    b = tokenizer.train_sentencepiece_bytes(list(CORPUS), 400)
    assert a == b


def test_round_trip_and_specials(spm_tok):
    tok = spm_tok
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert 300 < tok.vocab_size <= 400
    for text in ["Compute: 12+345*6", "  two  spaces\nnewline\n", "héllo ☃ 世界 🚀", "\\boxed{1/2}"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    ids = tok.encode("1+2", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "1+2"
    assert tok.decode(ids, skip_special=False) == "<s>1+2</s>"
    assert tok.decode(ids + [tok.pad_id] * 3) == "1+2"
    assert tok.decode(ids + [tok.vocab_size + 5]) == "1+2"  # ids past the vocab are dropped


def test_unseen_characters_use_byte_fallback(spm_tok):
    ids = spm_tok.encode("Ω")
    assert spm_tok.sp.unk_id() not in ids
    assert [spm_tok.id_to_token(i) for i in ids] == ["<0xCE>", "<0xA9>"]


def test_digits_are_single_tokens(spm_tok):
    pieces = [spm_tok.id_to_token(i) for i in spm_tok.encode("1234+567")]
    assert pieces == ["1", "2", "3", "4", "+", "5", "6", "7"]


def test_token_lookup_and_template(spm_tok):
    assert spm_tok.token_to_id("</s>") == spm_tok.eos_id
    assert spm_tok.token_to_id("\n") == spm_tok.encode("\n")[0]
    with pytest.raises(KeyError, match="nope"):
        spm_tok.token_to_id("nope")
    assert spm_tok.apply_template("\\frac{1}{2}") == "Q: \\frac{1}{2}\nA:"


def test_build_train_reuses_file(tmp_path):
    config = get_base_config()
    task = tasks.get_task(config.task)
    tok = tokenizer.build(config.tokenizer, str(tmp_path), corpus=task.corpus())
    path = tokenizer.trained_path(str(tmp_path))
    blob = open(path, "rb").read()
    # a resumed run without a corpus gets the identical file and ids
    tok2 = tokenizer.build(config.tokenizer, str(tmp_path))
    assert open(path, "rb").read() == blob
    text = tok.apply_template(task.train_problems(1, 0)[0].prompt)
    assert tok.encode(text) == tok2.encode(text)
    # the arithmetic prompts and traces stay short
    for p in task.train_problems(50, 3):
        assert len(tok.encode(tok.apply_template(p.prompt))) < 64
        assert tok.decode(tok.encode(task.solution_text(p))) == task.solution_text(p)


def test_build_errors_name_the_field(tmp_path):
    config = get_base_config()
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        tokenizer.build(config.tokenizer, str(tmp_path))  # 'train', no corpus, no file
    config.tokenizer.kind = "sentencepiece"
    config.tokenizer.path = str(tmp_path / "missing.model")
    with pytest.raises(ConfigError, match=r"tokenizer.path.*missing.model"):
        tokenizer.build(config.tokenizer, str(tmp_path))
    config.tokenizer.kind = "hf"
    config.tokenizer.path = str(tmp_path / "nothere" / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"tokenizer.path.*nothere"):
        tokenizer.build(config.tokenizer, str(tmp_path))


def test_build_sentencepiece_kind(tmp_path, spm_tok):
    config = get_base_config()
    config.tokenizer.kind = "sentencepiece"
    config.tokenizer.path = spm_tok.path
    tok = tokenizer.build(config.tokenizer)
    assert tok.encode("3+4") == spm_tok.encode("3+4")


def _tiny_hf_tokenizer(directory, with_config: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if with_config:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": None, "eos_token": {"content": "<pad>"}, "pad_token": None}, f)
    return os.path.join(directory, "tokenizer.json")


def test_hf_tokenizer_json(tmp_path):
    path = _tiny_hf_tokenizer(str(tmp_path / "a"), with_config=False)
    config = get_base_config()
    config.tokenizer.kind = "hf"
    config.tokenizer.path = path
    config.tokenizer.prompt_template = "<s>{prompt}"
    tok = tokenizer.build(config.tokenizer)
    assert isinstance(tok, tokenizer.Tokenizer)
    assert tok.bos_id == tok.token_to_id("<s>") and tok.eos_id == tok.token_to_id("</s>")
    assert tok.pad_id == tok.token_to_id("<pad>")
    for text in ["Compute: 3+4", "héllo ☃ unseen"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("3+4", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == "3+4"
    assert tok.encode(tok.apply_template("x"))[0] == tok.bos_id  # special token text is parsed
    # a directory path works too, and explicit names win
    config.tokenizer.path = str(tmp_path / "a")
    config.tokenizer.eos_token = "<unk>"
    assert tokenizer.build(config.tokenizer).eos_id == tok.token_to_id("<unk>")
    config.tokenizer.eos_token = "<|missing|>"
    with pytest.raises(ConfigError, match="tokenizer.eos_token"):
        tokenizer.build(config.tokenizer)


def test_hf_tokenizer_config_json(tmp_path):
    path = _tiny_hf_tokenizer(str(tmp_path / "b"), with_config=True)
    tok = tokenizer.HFTokenizer(path)
    assert tok.eos_id == tok.token_to_id("<pad>")  # from tokenizer_config.json
    assert tok.pad_id == tok.token_to_id("<pad>")
    assert tok.pad_id >= 0
