"""Every config field is read by the code (no knob that nothing reads).

A field counts as read when the roles or the library (outside the sections' own defaults() and
validate()) load it: an attribute ``x.field``, a key ``x["field"]`` / ``x.get("field")`` or a
keyword ``field=`` (a dataclass built from the section). Names are matched per field, so a field
whose name is used elsewhere for something else can slip through; a field nobody reads cannot.
"""

from __future__ import annotations

import ast
import os

import ml_collections

from rlax_tpu.config import get_base_config
from tests.helpers import ROOT

CODE = ("rlax_tpu", "trainer", "inference_worker", "param_server")
SECTIONS = os.path.join("rlax_tpu", "config", "sections")
DEFINITIONS = ("defaults", "validate")
# Fields whose whole job is to let validation accept a setting it would otherwise refuse.
VALIDATION_ONLY = {"rl.allow_uncorrected_staleness"}


def _fields(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            out += _fields(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def _names_read() -> set[str]:
    names: set[str] = set()
    for pkg in CODE:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                with open(path) as fh:
                    tree = ast.parse(fh.read(), path)
                skip: set[int] = set()
                if os.path.relpath(dirpath, ROOT).startswith(SECTIONS):
                    for node in tree.body:
                        if isinstance(node, ast.FunctionDef) and node.name in DEFINITIONS:
                            skip.update(id(n) for n in ast.walk(node))
                for node in ast.walk(tree):
                    if id(node) in skip:
                        continue
                    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                        names.add(node.attr)
                    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                        names.add(node.value)
                    elif isinstance(node, ast.keyword) and node.arg:
                        names.add(node.arg)
    return names


def test_every_config_field_is_read():
    read = _names_read()
    unread = [f for f in _fields(get_base_config()) if f.split(".")[-1] not in read and f not in VALIDATION_ONLY]
    assert unread == [], f"config fields no code reads: {unread}"


def test_the_check_finds_an_unread_field():
    c = get_base_config()
    c.replay.a_knob_nothing_reads = 1
    read = _names_read()
    assert "replay.a_knob_nothing_reads" in [f for f in _fields(c) if f.split(".")[-1] not in read]
