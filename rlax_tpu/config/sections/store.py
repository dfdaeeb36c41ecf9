"""config.store: the run's kvstore shared by all roles (weights and the replay queue).

The fields below ``publish_dtype`` tune the param server (param_server/): how versions are
written, how long pins last, how many versions garbage collection keeps.
"""

import ml_collections

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.config.sections._checks import one_of, positive
from rlax_tpu.kvstore import SUPPORTED_SCHEMES

SECTION = "store"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # kvstore URL: file://..., gs://bucket/run/, memory:// (tests). '' = file://<workdir>/store/.
    c.url = ""
    # dtype in which floating-point weights are published to workers (integer leaves keep theirs).
    c.publish_dtype = "bfloat16"
    # Garbage collection keeps the newest `gc_keep` committed versions (plus LATEST and pinned ones).
    c.gc_keep = 3
    # Seconds a reader's pin on a version lasts unless renewed; expired pins no longer protect it.
    c.pin_ttl_s = 600.0
    # Seconds between two garbage-collection passes of `python -m param_server.main --mode=janitor`.
    c.janitor_interval_s = 60.0
    # Target size in MiB of one zarr chunk. Chunks tile each device shard exactly (a shard is split
    # into several chunks when larger), so a host only ever writes chunks of its own shards.
    c.chunk_mib = 32
    # Per-chunk compression: 'none' (bf16 weights barely compress) or 'zstd' (level 1).
    c.compression = "none"
    # Parallel chunk reads/writes (tensorstore file_io_concurrency and data_copy_concurrency).
    c.io_concurrency = 32
    # fsync every written file (file:// only). False is faster but a power loss (not a kill -9)
    # could lose a version that LATEST already names.
    c.file_io_sync = True
    # Seconds between two reads of params/LATEST in wait_for_newer and the variable client.
    c.poll_interval_s = 0.5
    # Multi-host publish: seconds process 0 waits for every process's shards (and the others wait
    # for the commit) before the publish fails.
    c.commit_timeout_s = 600.0
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    if c.url and not c.url.startswith(SUPPORTED_SCHEMES):
        raise ConfigError("store.url", f"unknown scheme in {c.url!r}; expected one of {SUPPORTED_SCHEMES}")
    one_of(SECTION, c, "publish_dtype", ("float32", "bfloat16"))
    one_of(SECTION, c, "compression", ("none", "zstd"))
    if not isinstance(c.gc_keep, int) or isinstance(c.gc_keep, bool) or c.gc_keep < 1:
        raise ConfigError("store.gc_keep", f"must be an int >= 1, got {c.gc_keep!r}")
    for field in ("pin_ttl_s", "janitor_interval_s", "chunk_mib", "io_concurrency", "poll_interval_s",
                  "commit_timeout_s"):
        positive(SECTION, c, field)
    if not isinstance(c.file_io_sync, bool):
        raise ConfigError("store.file_io_sync", f"must be a bool, got {c.file_io_sync!r}")
