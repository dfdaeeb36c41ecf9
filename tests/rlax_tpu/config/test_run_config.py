"""The run's config.json: written by the trainer at start, checked by every role on resume; only
the fields run_config.MAY_CHANGE lists may differ, and the error names the others."""

from __future__ import annotations

import json
import types

import pytest
from absl import app

from rlax_tpu.config import ConfigError, cli, load_config, run_config

SPEC = "configs/arith_grpo.py:smoke"


def _flags(config, workdir):
    return types.SimpleNamespace(value=config), types.SimpleNamespace(value=workdir)


def test_the_trainer_records_its_config_and_a_resume_may_change_only_the_listed_fields(tmp_path):
    wd = str(tmp_path)
    config = cli.start(*_flags(_unlocked(), wd), run_config="write")
    stored = run_config.read(wd)
    assert stored == run_config.resolved(config) and stored["name"] == config.name
    # Allowed: train longer, another mesh, other eval settings; the file follows the new run.
    longer = _unlocked({"trainer.steps": config.trainer.steps + 5, "eval.every": 3, "mesh.fsdp": 1})
    cli.start(*_flags(longer, wd), run_config="write")
    assert run_config.read(wd)["trainer"]["steps"] == config.trainer.steps + 5
    # Not allowed: another objective or model; a worker ('check') is refused the same way.
    other = _unlocked({"rl.group_size": 2, "model.hidden_size": 32})
    with pytest.raises(ConfigError, match=r"model\.hidden_size, rl\.group_size: differ .*4 in the run, 2 now"):
        run_config.check(other, wd, write=False)
    with pytest.raises(app.UsageError, match=r"rl\.group_size"):
        cli.start(*_flags(_unlocked({"rl.group_size": 2}), wd), run_config="check")
    assert run_config.read(wd)["rl"]["group_size"] == config.rl.group_size  # a refused start writes nothing
    # A field the stored file lacks (added to the code since) has nothing to compare with.
    with open(run_config.path(wd)) as f:
        data = json.load(f)
    del data["rl"]["reuse_max_age"]
    with open(run_config.path(wd), "w") as f:
        json.dump(data, f)
    run_config.check(_unlocked({"trainer.steps": config.trainer.steps + 5, "mesh.fsdp": 1, "eval.every": 3}), wd,
                     write=False)


def test_every_may_change_entry_names_a_field_or_section():
    from rlax_tpu.config import get_base_config

    flat = run_config._flat(run_config.resolved(get_base_config()))
    for entry in run_config.MAY_CHANGE:
        assert any(k == entry or k.startswith(entry + ".") for k in flat), entry


def test_the_param_server_status_ignores_the_run_config(tmp_path):
    wd = str(tmp_path)
    cli.start(*_flags(_unlocked(), wd), run_config="write")
    status = load_config("configs/param_server_status.py")
    status.unlock()
    cli.start(*_flags(status, wd), run_config="ignore")


def _unlocked(overrides=None):
    c = load_config(SPEC, overrides)
    c.unlock()
    return c
