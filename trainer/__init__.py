"""The trainer role: one JAX program (multi-host on a pod), the run's only writer of weights.

    python -m trainer.main --config=configs/X.py[:arg] --workdir=DIR

Does: reads prompts through a checkpointed grain iterator, issues tasks and admits rollout groups
(its half of the replay queue: ``replay_controller``, ``controller``), trains (``learner``: RL
and SFT steps under jax.jit with explicit shardings), publishes weights to the param server and
checkpoints everything a restart needs (``checkpointing``).
Reads: the config, the prompts, ``rollouts/`` in the run's store, its own checkpoints.
Writes: ``tasks/`` and run metadata (``meta/``) in the store, weight versions (``params/``),
orbax checkpoints, metrics.jsonl / TensorBoard under the workdir.
"""
