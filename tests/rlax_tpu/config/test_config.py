"""Config framework: defaults validate, bad values name their field, files load with variants."""

import pytest

from rlax_tpu.config import ConfigError, finalize, get_base_config, load_config


def test_base_config_validates_and_locks():
    config = finalize(get_base_config())
    with pytest.raises(AttributeError):
        config.not_a_field = 1  # locked: typos fail


@pytest.mark.parametrize(
    "field,value",
    [
        ("rl.max_staleness", -1),
        ("model.arch", "gpt2"),
        ("model.num_kv_heads", 3),
        ("store.url", "s3://bucket/run"),
        ("tokenizer.prompt_template", "no placeholder"),
        ("inference.max_batch", 0),
        # RL rollouts must come from the distribution the trainer's log-probs describe.
        ("inference.temperature", 0.0),
        ("inference.top_k", 20),
        ("inference.top_p", 0.9),
        ("model.dtype", "float16"),
        ("trainer.pack_len", -1),
        ("trainer.pack_len", 8),  # shorter than inference.max_seq_len: a sample would not fit
    ],
)
def test_bad_value_names_the_field(field, value):
    config = get_base_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        finalize(config)


def test_load_config_file_with_variant_and_override(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(
        "from rlax_tpu.config import get_base_config\n"
        "def get_config(arg=''):\n"
        "    c = get_base_config()\n"
        "    if arg == 'smoke':\n"
        "        c.trainer.steps = 3\n"
        "    return c\n"
    )
    config = load_config(f"{path}:smoke", overrides={"rl.max_staleness": 0})
    assert config.trainer.steps == 3 and config.rl.max_staleness == 0
    with pytest.raises(ConfigError, match="rl.nope"):
        load_config(str(path), overrides={"rl.nope": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))


def test_inference_slots_must_divide_over_the_data_axes():
    config = get_base_config()
    config.inference.mesh.data, config.inference.mesh.tensor = 3, 1
    config.inference.max_batch = 32
    with pytest.raises(ConfigError, match=r"inference\.max_batch.*= 3"):
        finalize(config)
    config.inference.max_batch = 33
    finalize(config)


def test_greedy_evaluation_stays_allowed():
    config = get_base_config()
    config.eval.temperature = 0.0
    assert finalize(config).eval.temperature == 0.0
