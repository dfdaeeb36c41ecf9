"""Tools and verifiers run where episodes are driven, never in the trainer.

The trainer reads environments for their problems and first messages (the controller's prompts)
and for the token layout of episodes (SFT traces, written beforehand by the traces CLI); it never
imports the sandbox or the tool-running modules, and the environments it builds hold no sandbox
pool."""

from __future__ import annotations

import ast
import os

from tests.helpers import ROOT

FORBIDDEN = ("rlax_tpu.sandbox", "rlax_tpu.envs.tools", "rlax_tpu.envs.python_tool")


def _imports(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_the_trainer_never_imports_the_sandbox_or_the_tools():
    bad = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "trainer")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                bad += [(os.path.relpath(path, ROOT), m) for m in _imports(path)
                        if any(m == x or m.startswith(x + ".") for x in FORBIDDEN)]
    assert bad == []


def test_the_check_sees_an_import(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("def f():\n    from rlax_tpu import sandbox\n")
    assert "rlax_tpu.sandbox" in _imports(str(p))


def test_the_controllers_environments_build_no_sandbox_pool(monkeypatch):
    from rlax_tpu import envs, sandbox
    from rlax_tpu.config import get_base_config
    from rlax_tpu.envs import registry

    def refuse(*_, **__):
        raise AssertionError("a sandbox pool was built for a problems-only environment")

    monkeypatch.setattr(sandbox.SandboxPool, "__init__", refuse)
    for name in sorted(registry.ENVS):
        config = get_base_config()
        config.env.name = name
        env = envs.make_env(config, len, problems_only=True)
        problem = env.train_problems(1, 0)[0]
        assert env.reset(problem)  # the first messages, as the controller renders them
