"""Process-wide logging set-up for the mains: our INFO lines, other libraries' warnings only."""

from __future__ import annotations

import logging

NOISY = ("absl", "orbax", "jax", "tensorstore", "grain")


def setup(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # absl is a dependency; tolerate its absence in odd environments
        pass
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
