"""Whether this host can run the bubblewrap sandbox (installed, and user namespaces allowed)."""

from __future__ import annotations

import shutil

import pytest

from rlax_tpu.sandbox import SandboxLimits, layers


def bwrap_usable() -> bool:
    return shutil.which("bwrap") is not None and layers(SandboxLimits.default())[0]


needs_bwrap = pytest.mark.skipif(not bwrap_usable(), reason="bubblewrap is not installed or not usable here")
