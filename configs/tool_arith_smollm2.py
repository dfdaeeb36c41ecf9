"""Tool-integrated arithmetic on SmolLM2-135M-Instruct: SFT on solved tool-use episodes in the
model's own chat template, then GRPO (clip-higher, token-mean loss, truncated IS), on a CPU.

    python -m rlax_tpu.models.fetch smollm2
    python -m rlax_tpu.envs.traces --config=configs/tool_arith_smollm2.py   # the SFT episodes
    python -m rlax_tpu.launch --config=configs/tool_arith_smollm2.py --workdir=runs/tool_arith_smollm2

(`scripts/demo.sh tool_arith` runs the three.) One operation on 3-4 digit operands ('What is
4821 * 377?'), too large for a 135M model to do in its head, with a `python` tool run in the
sandbox; the answer ('#### N') is checked exactly. The SFT episodes are the environment's
reference turns (a Python call, then the answer) with the tool's actual replies, laid out as
the rollouts are (environment tokens carry no loss). ~10 minutes on 2 CPU cores; seed 0 gave
held-out pass@1 (24 problems x 4 at T=1) 0% before SFT, 27.1% after SFT, 50.0% after 8 RL steps
(docs/envs.md).
Variant 'smoke': a few steps and tiny sizes for tests (which replace the model).
"""

from rlax_tpu.config import get_base_config, presets
from rlax_tpu.models.fetch import cached_path


def get_config(arg: str = ""):
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown variant {arg!r} (expected '' or 'smoke')")
    c = get_base_config()
    c.name = "tool_arith_smollm2"
    c.env.name = "tool_arith"
    c.env.max_turns = 3  # a call, the answer, one retry
    c.env.max_total_tokens = 192  # model and tool tokens after the ~220-token prompt
    c.env.max_tool_seconds = 10.0
    c.task.operators = "+-*"
    c.task.min_difficulty = c.task.difficulty = 1
    c.task.eval_fraction = 0.2
    c.task.num_eval = 24
    presets.pretrained(c, cached_path("smollm2"), "gguf")
    c.model.logprob_chunk = 1024
    # 8 x 6 episodes at 4e-5. Weaker SFT (12 x 4 at 2e-5, NLL ~0.1) left most calls malformed and
    # RL without reward; much stronger (32 x 4, NLL ~3e-4) solves every episode it finishes and
    # collapses the entropy, so every group agrees and RL has nothing to learn (docs/envs.md).
    c.sft.steps = 8
    c.sft.batch_size = 6
    c.sft.learning_rate = 4e-5
    c.sft.warmup_steps = 2
    c.sft.max_len = 352
    c.sft.traces_path = "runs/sft_traces/tool_arith.jsonl"
    c.rl.group_size = 4
    c.rl.mini_batches = 1  # one update per step (groups are never split across updates)
    # No dynamic sampling: after SFT many groups agree, and refilling them would stall a CPU run.
    c.rl.dynamic_sampling = False
    c.trainer.steps = 8
    c.trainer.batch_size = 1
    c.trainer.learning_rate = 3e-5
    c.trainer.warmup_steps = 1
    c.trainer.checkpoint_every = 4
    # Rematerialized layers and chunked log-probs: the trainer's peak memory. Groups of 8 at 448
    # tokens still went past 13 GB on CPU (OOM-killed on this shared box), so groups stay at 4.
    c.trainer.remat = True
    c.inference.max_seq_len = 448  # the prompt + env.max_total_tokens + one turn's room
    c.inference.max_new_tokens = 64  # per model turn
    c.inference.max_batch = 16
    c.inference.max_prefill_batch = 4
    # Pages for every slot plus the retained sequences between an episode's turns: with the
    # default pool the evaluator (24 x 4 episodes) ran out and those turns failed (masked).
    c.inference.num_pages = 1024
    c.replay.worker_max_leases = 2
    c.launch.num_workers = 1
    c.store.publish_dtype = "float32"  # f32 on CPU: the engine samples exactly the trainer's policy
    c.eval.num_samples = 4
    c.eval.ks = (1, 4)
    c.eval.every = 8  # step 0 (after SFT) and the last step; before SFT: evaluator --checkpoint
    if arg == "smoke":
        c.sft.steps = 2
        c.sft.batch_size = 2
        c.sft.warmup_steps = 0
        c.trainer.steps = 2
        c.trainer.batch_size = 1
        c.rl.group_size = 2
        c.rl.mini_batches = 1
        c.task.num_eval = 2
        c.eval.num_samples = 1
        c.eval.ks = (1,)
        c.eval.every = 0
    return c
