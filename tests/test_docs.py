"""Every command the README and docs/ show runs: each module and script answers --help, each
script file exists, and each concrete --config (with its --config.* overrides) loads and
validates. Long commands are checked this way rather than run."""

from __future__ import annotations

import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import ROOT

PY = r"(?:\.venv/bin/)?python3?"
MODULE = re.compile(rf"(?:^|[\s;&|(]){PY} -m ([\w.]+)(.*)")
SCRIPT_PY = re.compile(rf"(?:^|[\s;&|(]){PY} (scripts/[\w./-]+\.py)")
SCRIPT_SH = re.compile(r"(?:^|[\s;&|(])(?:bash )?(scripts/[\w./-]+\.sh)")
PLACEHOLDER = re.compile(r"X\.py|\.\.\.|/ckpt|<|\bDIR\b|\bSPEC\b")


def _doc_files() -> list[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                               recursive=True))


def _commands() -> list[tuple[str, str]]:
    """(file, command line) for every line of every fenced code block, continuations joined."""
    out = []
    for path in _doc_files():
        with open(path) as f:
            text = f.read()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line:
                    out.append((os.path.relpath(path, ROOT), line))
    return out


COMMANDS = _commands()
MODULES = sorted({m.group(1) for _, line in COMMANDS for m in [MODULE.search(line)] if m})
SCRIPTS = sorted({m.group(1) for _, line in COMMANDS for rx in (SCRIPT_PY, SCRIPT_SH) for m in [rx.search(line)]
                  if m})


@functools.cache
def _help(argv: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run(list(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_the_docs_show_commands():
    assert {"trainer.main", "inference_worker.main", "inference_worker.evaluator", "param_server.main",
            "rlax_tpu.launch", "trainer.export", "rlax_tpu.models.fetch"} <= set(MODULES), MODULES
    assert "scripts/demo.sh" in SCRIPTS and "scripts/test.sh" in SCRIPTS


@pytest.mark.parametrize("module", MODULES)
def test_every_module_answers_help(module):
    res = _help((sys.executable, "-m", module, "--help"))
    out = res.stdout + res.stderr
    assert "Traceback" not in out and res.returncode in (0, 1), out[-3000:]  # absl exits 1 after --help
    assert "--" in out, out[-2000:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_exists_and_answers_help(script):
    path = os.path.join(ROOT, script)
    assert os.path.isfile(path), f"{script} is shown in the docs but does not exist"
    if script.endswith(".py"):
        res = _help((sys.executable, path, "--help"))
        assert res.returncode == 0 and "usage" in res.stdout, (res.stdout + res.stderr)[-3000:]
    else:
        res = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


def _configs():
    out = []
    for doc, line in COMMANDS:
        m = MODULE.search(line)
        if not m or PLACEHOLDER.search(line):
            continue
        args = shlex.split(m.group(2))
        spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
        if spec is None:
            i = args.index("--config") if "--config" in args else -1
            spec = args[i + 1] if i >= 0 and i + 1 < len(args) else None
        if spec:
            out.append((doc, spec, tuple(a for a in args if a.startswith(("--config.", "--noconfig.")))))
    return sorted(set(out))


@pytest.mark.parametrize("doc,spec,overrides", _configs())
def test_every_config_shown_loads_and_validates(doc, spec, overrides):
    from rlax_tpu.config import load_config

    load_config(spec, list(overrides))


REPO_PATH = re.compile(r"(?<![\w./<>-])((?:rlax_tpu|trainer|inference_worker|param_server|tests|scripts|configs|docs)"
                       r"/[\w./{},*-]*\w)")


def _named_paths() -> list[tuple[str, str]]:
    """(file, repository path) for each path the README, docs/ and the shell scripts name; a
    ``{a,b}`` list expands to each, a ``:variant`` suffix is dropped, ``X.py`` is a placeholder."""
    out = []
    for path in _doc_files() + sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh"))):
        with open(path) as f:
            text = f.read()
        for m in REPO_PATH.finditer(text):
            named = m.group(1).split(":")[0]
            alts = [named]
            if "{" in named and "}" in named:
                head, rest = named.split("{", 1)
                opts, tail = rest.split("}", 1)
                alts = [head + o + tail for o in opts.split(",")]
            out += [(os.path.relpath(path, ROOT), a) for a in alts if not a.endswith("/X.py")]
    return sorted(set(out))


def test_every_path_the_docs_name_exists():
    missing = [(doc, p) for doc, p in _named_paths() if not glob.glob(os.path.join(ROOT, p))]
    assert len(_named_paths()) > 50 and not missing, missing
