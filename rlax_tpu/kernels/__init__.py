"""Attention kernels: Pallas implementations beside jnp references, behind one dispatcher.

``impl``: 'auto' (Pallas on TPU/GPU, the reference on CPU), 'pallas' (forced; interpret mode on
CPU), 'reference' (jnp). Unsupported combinations raise; nothing falls back silently. The names
exported here run every Pallas call under ``jax.shard_map`` over the mesh the caller traces under
(sharded.py); ``dispatch`` holds the same calls for one device.
"""

from rlax_tpu.kernels.dispatch import KernelError
from rlax_tpu.kernels.sharded import (
    copy_pages,
    decode_attention,
    flash_attention,
    paged_decode_attention,
    paged_prefill_attention,
    under_mesh,
    write_pages,
)

__all__ = ["KernelError", "decode_attention", "flash_attention", "paged_decode_attention",
           "paged_prefill_attention", "under_mesh", "write_pages", "copy_pages"]
