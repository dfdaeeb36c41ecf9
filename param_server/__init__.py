"""param_server: versioned weight snapshots in tensorstore (zarr3 over the run's kvstore).

    python -m param_server.main --config=configs/X.py[:arg] --workdir=DIR [--mode=janitor]

The store (``ParamStore``) is a library both sides use: the trainer publishes (``publish`` /
``publish_async``), readers pull into their own sharding (``pull`` / ``read`` or a background
``VariableClient``). Bytes go straight between each role and storage. The role itself
(``main``) relays none: it is the janitor (garbage collection of old versions and expired pins)
and the status command. Reads and writes ``params/`` and ``run.json``; reads ``workers/``
heartbeats for the status. See docs/param_server.md.
"""

from param_server.errors import (
    BadVersionError,
    CorruptVersionError,
    FencedError,
    IncompleteVersionError,
    ParamServerError,
    PublishConflictError,
    PublishError,
    StoreError,
    TreeMismatchError,
    VersionNotFoundError,
)
from param_server.store import Options, ParamStore
from param_server.variable_client import VariableClient

__all__ = [
    "BadVersionError", "CorruptVersionError", "FencedError", "IncompleteVersionError", "Options",
    "ParamServerError", "ParamStore", "PublishConflictError", "PublishError", "StoreError",
    "TreeMismatchError", "VariableClient", "VersionNotFoundError",
]
