"""rlax_tpu: parameter-server reinforcement learning for LLMs on JAX.

Subpackages are imported lazily by their users (``from rlax_tpu import models``) so that light
tools (config validation, the replay queue) do not pay for importing the model stack.
"""

__version__ = "0.1.0"
