"""After each weight swap: does the engine hold the policy the trainer published?

The worker scores the canary tokens of the version's manifest (rlax_tpu/canary.py) under the
weights its engine holds and compares them with the trainer's figures. A mismatch beyond
``store.canary_tolerance`` is logged as a PolicyNotLandedError and counted (``canary_failed``
in the worker's heartbeat, summed into the trainer's ``canary/failed``); it never passes
silently. The worker keeps serving: the check reports, the next swap is checked again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flax import nnx

from rlax_tpu import canary
from rlax_tpu.models import ModelConfig

log = logging.getLogger(__name__)


class PolicyCheck:
    def __init__(self, config, model_cfg: ModelConfig, count: Callable[[str], None], name: str):
        self.tolerance = float(config.store.canary_tolerance)
        self.model_cfg, self.count, self.name = model_cfg, count, name
        self.last_error: canary.PolicyNotLandedError | None = None
        self.last_diff: float | None = None

    def after_swap(self, engine, version: int, manifest: dict | None) -> bool:
        """Checks the engine's weights against ``version``'s canary figures; False on a mismatch.
        A version published without figures (store.canary_prompts = 0) passes unchecked."""
        record = (manifest or {}).get("canary")
        if not record:
            return True
        tokens = np.asarray(record["tokens"], np.int32)
        got = canary.logprobs(self.model_cfg, nnx.to_pure_dict(engine.params), tokens, record["publish_dtype"])
        self.count(canary.CHECKED)
        try:
            self.last_diff = canary.compare(record, got, version, self.tolerance)
        except canary.PolicyNotLandedError as e:
            self.count(canary.FAILED)
            self.last_error, self.last_diff = e, e.max_diff
            log.error("worker %s: %s", self.name, e)
            return False
        log.info("worker %s: policy v%d landed (canary max |dlogp| %.2g)", self.name, version, self.last_diff)
        return True
