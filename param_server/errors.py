"""Errors of the param server; every message names the version, leaf or key concerned."""

from __future__ import annotations

from rlax_tpu.fencing import FencedError
from rlax_tpu.kvstore import StoreError


class ParamServerError(RuntimeError):
    """Base class of the param server's own errors."""


class VersionNotFoundError(ParamServerError):
    """The requested version was never committed, or garbage collection removed it."""


class BadVersionError(ParamServerError):
    """A committed version cannot be read correctly; readers refuse it and may fall back."""

    def __init__(self, version: int, message: str):
        self.version = version
        super().__init__(message)


class CorruptVersionError(BadVersionError):
    """A checksum (chunk crc32c or manifest digest) does not match: the bytes were altered."""


class IncompleteVersionError(BadVersionError):
    """A chunk, array or manifest of the version is missing."""


class TreeMismatchError(ParamServerError, ValueError):
    """The target tree does not match the manifest (leaf name, shape or dtype)."""


class PublishError(ParamServerError):
    """A publish failed; the version was not made visible."""


class PublishConflictError(PublishError):
    """LATEST moved past this publish's version (another publisher committed first)."""


__all__ = [
    "BadVersionError", "CorruptVersionError", "FencedError", "IncompleteVersionError",
    "ParamServerError", "PublishConflictError", "PublishError", "StoreError", "TreeMismatchError",
    "VersionNotFoundError",
]
