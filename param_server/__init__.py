"""param_server: versioned weight snapshots in tensorstore (zarr3 over a kvstore).

The trainer publishes (``ParamStore.publish`` / ``publish_async``); inference workers pull into
their own sharding (``ParamStore.pull`` or a background ``VariableClient``). ``python -m
param_server.main`` is the janitor (gc) and status process. See docs/param_server.md.
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
