"""rlax_tpu: the library the roles (trainer, inference_worker, param_server) are built from.

Models and kernels, the RL objective, tasks and rewards, tokenizers, configs, sharding rules, the
run's kvstore and the wire formats the roles exchange through it (replay records and keys, run
metadata, eval keys), and the launcher that runs every role on one machine. It imports no role
package. Subpackages are imported by their users (``from rlax_tpu import models``) so that light
tools (config validation) do not pay for importing the model stack.
"""

__version__ = "0.1.0"
