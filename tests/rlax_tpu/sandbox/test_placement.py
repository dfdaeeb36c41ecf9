"""Tools and verifiers run where episodes are driven, never in the trainer."""

from __future__ import annotations

import ast
import os

from tests.helpers import ROOT

FORBIDDEN = ("rlax_tpu.sandbox", "rlax_tpu.envs")


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


def test_the_trainer_never_imports_the_sandbox_or_environments():
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
