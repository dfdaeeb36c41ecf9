"""The inference roles: stateless, preemptible, as many as you like.

    python -m inference_worker.main --config=configs/X.py[:arg] --workdir=DIR       # a rollout worker
    python -m inference_worker.evaluator --config=... --workdir=DIR                 # the evaluator

Worker (``worker``): pulls the newest weights (``param_server.VariableClient``), leases tasks
(its half of the replay queue: ``replay_client``), generates with the ``engine`` and scores each
completion with the task's verifiable reward. Reads ``meta/``, ``params/``, ``tasks/``; writes
``leases/``, ``rollouts/`` and its heartbeat under ``workers/``.
Evaluator (``evaluator``): held-out pass@k of the published weights steps the config names.
Reads ``meta/`` and ``params/``; writes ``evals/`` and <workdir>/eval.jsonl.
Killing either at any moment loses nothing.
"""
