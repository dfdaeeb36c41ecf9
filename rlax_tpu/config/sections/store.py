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
    # file:// pulls read chunk files with O_DIRECT: the device writes straight into the buffer the
    # device array is made from (no page-cache copy, every 1 MiB segment one request in flight),
    # 2-5x faster than buffered reads when the files are not in this machine's page cache
    # (docs/benchmarks/params.md). False reads through the page cache (faster only for files
    # this machine just wrote or read). File systems without O_DIRECT fall back on their own.
    c.direct_io = True
    # Seconds between two reads of params/LATEST in wait_for_newer and the variable client.
    c.poll_interval_s = 0.5
    # Multi-host publish: seconds process 0 waits for every process's shards (and the others wait
    # for the commit) before the publish fails.
    c.commit_timeout_s = 600.0
    # Delta publishing (full fine-tuning): a version is stored as the elements that changed since
    # the publisher's previous version, with a full keyframe every `keyframe_every` versions.
    # Readers that hold the previous version apply the delta; late joiners read the nearest
    # keyframe and the deltas after it. Readers (the variable client) then keep a host copy of
    # the weights in the publish dtype to apply deltas to. Single-process publishers only (a
    # multi-host publish writes keyframes).
    c.delta = False
    # A full version every N versions (1 = every version is a keyframe); bounds a late joiner's
    # chain to N-1 deltas and the versions gc must keep for a pinned reader.
    c.keyframe_every = 10
    # How a changed leaf is stored: 'xor' (the bitwise XOR against the previous values,
    # zstd-compressed) or 'sparse' (positions + new values in the publish dtype; a leaf whose
    # sparse form would not be smaller is written in full). Measured on SmolLM2-135M
    # (docs/benchmarks/params.md): xor is 2/3 of sparse's bytes in bf16 and half of full in f32,
    # where sparse saves nothing; sparse rebuilds a late joiner's chain faster.
    c.delta_encoding = "xor"
    # The policy-landed check (rlax_tpu/canary.py): with every version the trainer publishes the
    # log-probs of `canary_prompts` fixed random token sequences of `canary_tokens` tokens under
    # the weights as published; after each weight swap a worker scores them under what its
    # engine holds, and a difference above `canary_tolerance` (nats, max over tokens) is a
    # PolicyNotLandedError in its log and counted in its heartbeat and the trainer's metrics
    # (canary/failed). 0 prompts turns the check off. Both sides compute in float32 from the
    # publish-dtype weights, so a landed policy agrees to ~3e-5 on SmolLM2-135M; one small
    # update moved them by 0.01-0.05 (docs/benchmarks/params.md).
    c.canary_prompts = 2
    c.canary_tokens = 16
    c.canary_tolerance = 1e-3
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    if c.url and not c.url.startswith(SUPPORTED_SCHEMES):
        raise ConfigError("store.url", f"unknown scheme in {c.url!r}; expected one of {SUPPORTED_SCHEMES}")
    one_of(SECTION, c, "publish_dtype", ("float32", "bfloat16"))
    one_of(SECTION, c, "compression", ("none", "zstd"))
    one_of(SECTION, c, "delta_encoding", ("sparse", "xor"))
    if not isinstance(c.keyframe_every, int) or isinstance(c.keyframe_every, bool) or c.keyframe_every < 1:
        raise ConfigError("store.keyframe_every", f"must be an int >= 1, got {c.keyframe_every!r}")
    if not isinstance(c.canary_prompts, int) or isinstance(c.canary_prompts, bool) or c.canary_prompts < 0:
        raise ConfigError("store.canary_prompts", f"must be an int >= 0, got {c.canary_prompts!r}")
    if not isinstance(c.canary_tokens, int) or isinstance(c.canary_tokens, bool) or c.canary_tokens < 2:
        raise ConfigError("store.canary_tokens", f"must be an int >= 2, got {c.canary_tokens!r}")
    if not isinstance(c.gc_keep, int) or isinstance(c.gc_keep, bool) or c.gc_keep < 1:
        raise ConfigError("store.gc_keep", f"must be an int >= 1, got {c.gc_keep!r}")
    for field in ("pin_ttl_s", "janitor_interval_s", "chunk_mib", "io_concurrency", "poll_interval_s",
                  "commit_timeout_s", "canary_tolerance"):
        positive(SECTION, c, field)
    for field in ("file_io_sync", "delta", "direct_io"):
        if not isinstance(c[field], bool):
            raise ConfigError(f"store.{field}", f"must be a bool, got {c[field]!r}")
