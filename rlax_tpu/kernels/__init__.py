"""Attention kernels: Pallas implementations beside jnp references, behind one dispatcher.

``impl``: 'auto' (Pallas on TPU/GPU, the reference on CPU), 'pallas' (forced; interpret mode on
CPU), 'reference' (jnp). Unsupported combinations raise; nothing falls back silently.
"""

from rlax_tpu.kernels.dispatch import KernelError, decode_attention, flash_attention

__all__ = ["KernelError", "decode_attention", "flash_attention"]
