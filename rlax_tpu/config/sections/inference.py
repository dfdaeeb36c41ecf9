"""config.inference: the generation engine and the worker loop."""

import ml_collections

from rlax_tpu.config.sections import mesh as mesh_section
from rlax_tpu.config.sections._checks import positive

SECTION = "inference"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Concurrent sequences (decode slots) in the engine.
    c.max_batch = 32
    # KV-cache length per slot: prompt + generated tokens must fit.
    c.max_seq_len = 256
    c.max_new_tokens = 64
    c.temperature = 1.0
    c.top_k = 0  # 0 disables top-k
    c.top_p = 1.0  # 1.0 disables top-p
    # The worker's own mesh (weights are resharded on pull); by default tensor-parallel only.
    c.mesh = mesh_section.defaults()
    c.mesh.fsdp = 1
    c.mesh.tensor = -1
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    for f in ("max_batch", "max_seq_len", "max_new_tokens"):
        positive(SECTION, c, f)
    positive(SECTION, c, "temperature", allow_zero=True)
    positive(SECTION, c, "top_k", allow_zero=True)
    positive(SECTION, c, "top_p")
    mesh_section.validate(c.mesh, config, section="inference.mesh")
