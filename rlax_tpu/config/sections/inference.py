"""config.inference: the generation engine and the worker loop."""

import ml_collections

from rlax_tpu.config.sections import mesh as mesh_section
from rlax_tpu.config.sections._checks import positive, require

SECTION = "inference"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Concurrent sequences (decode slots) in the engine.
    c.max_batch = 32
    # KV-cache length per slot: prompt + generated tokens must fit.
    c.max_seq_len = 256
    c.max_new_tokens = 64
    # Sampling of the rollouts: softmax(logits / temperature). The trainer's proximal, current
    # and reference log-probs are taken under the same temperature, so it must be > 0 (greedy
    # rollouts have no distribution to train on; eval.temperature may be 0).
    c.temperature = 1.0
    # Truncated sampling: top_k = 0 and top_p = 1.0 disable it, and RL requires both (the
    # trainer's log-probs are over the whole vocabulary, so truncated rollouts would come from
    # another distribution than the one trained).
    c.top_k = 0
    c.top_p = 1.0
    # Decode steps run on device per host round trip, and prompts prefilled together at most.
    c.decode_chunk = 16
    c.max_prefill_batch = 8
    # With no request waiting for a slot, a decode call may run up to this many steps (the loop
    # exits as soon as every sequence has stopped).
    c.max_decode_chunk = 64
    # The paged KV cache: positions per page, and pages in the pool (0: enough for every slot at
    # max_seq_len, i.e. max_batch * ceil(max_seq_len / page_size) plus the reserved null page).
    # A smaller pool makes requests wait (or preempts the newest sequence) when pages run out.
    # With mesh data x fsdp = d > 1 the pool is d equal blocks, one per shard of the slots, each
    # with its own null page: num_pages must divide by d (0 sizes each block for its slots).
    c.page_size = 16
    c.num_pages = 0
    # How long a worker waits for the trainer's run metadata (model config, tokenizer) and, between
    # log lines, for the first weights.
    c.meta_timeout_s = 600.0
    c.weights_timeout_s = 60.0
    # The worker's own mesh (weights are resharded on pull); by default tensor-parallel only over
    # the worker's devices. data (or fsdp) > 1 also splits the decode slots over those axes
    # (max_batch must divide by their product).
    c.mesh = mesh_section.defaults()
    c.mesh.fsdp = 1
    c.mesh.tensor = -1
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    for f in ("max_batch", "max_seq_len", "max_new_tokens", "decode_chunk", "max_decode_chunk",
              "max_prefill_batch", "meta_timeout_s", "weights_timeout_s"):
        positive(SECTION, c, f)
    positive(SECTION, c, "temperature", allow_zero=True)
    positive(SECTION, c, "top_k", allow_zero=True)
    positive(SECTION, c, "top_p")
    _check_rl_sampling(c)
    positive(SECTION, c, "page_size")
    positive(SECTION, c, "num_pages", allow_zero=True)
    if c.num_pages == 1:
        from rlax_tpu.config.errors import ConfigError

        raise ConfigError("inference.num_pages", "=1 leaves no usable page (page 0 is reserved): use 0 or >= 2")
    mesh_section.validate(c.mesh, config, section="inference.mesh")
    if c.max_new_tokens >= c.max_seq_len:
        from rlax_tpu.config.errors import ConfigError

        raise ConfigError("inference.max_new_tokens", f"={c.max_new_tokens} leaves no room for a prompt in "
                          f"inference.max_seq_len={c.max_seq_len}")
    groups = 1
    for axis in ("data", "fsdp"):
        groups *= max(int(c.mesh[axis]), 1)  # -1 (the rest) is checked by the engine
    if c.max_batch % groups:
        from rlax_tpu.config.errors import ConfigError

        raise ConfigError("inference.max_batch", f"={c.max_batch} must divide by inference.mesh.data x "
                          f"inference.mesh.fsdp = {groups} (the slots are split over them)")
    group, leases = config.rl.group_size, config.replay.worker_max_leases
    if group * leases > c.max_batch:
        from rlax_tpu.config.errors import ConfigError

        raise ConfigError("inference.max_batch", f"={c.max_batch} slots cannot hold replay.worker_max_leases="
                          f"{leases} groups of rl.group_size={group} at once")


def _check_rl_sampling(c: ml_collections.ConfigDict) -> None:
    """Rollouts must come from the distribution the trainer's log-probs describe."""
    require(c.temperature > 0, "inference.temperature",
            "must be > 0 for RL rollouts: greedy decoding (0) has no sampling distribution for the "
            "trainer's log-probs (eval.temperature may be 0)")
    require(c.top_k == 0, "inference.top_k",
            f"={c.top_k}: RL needs untruncated sampling (0), since the trainer's log-probs are over the "
            "whole vocabulary")
    require(c.top_p == 1.0, "inference.top_p",
            f"={c.top_p}: RL needs untruncated sampling (1.0), since the trainer's log-probs are over the "
            "whole vocabulary")
