"""bf16 against f32 compute on a trained toy checkpoint: the RL gradient on the run's own rollout
groups, and the SFT answer NLL of training and held-out traces. Prints one JSON line.

    JAX_PLATFORMS=cpu python scripts/precision_check.py --checkpoint=HF_DIR [--workdir=RUN]

HF_DIR: a ``trainer.export`` of an arith_grpo run (its sentencepiece tokenizer inside). RUN: that
run's workdir, whose store still holds rollout groups (the unacked tail of the queue); without
it only the NLLs are measured. The masters are f32 in both cases, only the compute dtype differs
(as in the trainer).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs.arith_grpo import get_config  # noqa: E402
from rlax_tpu import models, rl, sharding, store_layout  # noqa: E402
from rlax_tpu import tasks as tasks_lib  # noqa: E402
from rlax_tpu import tokenizer as tokenizer_lib  # noqa: E402
from rlax_tpu.replay.records import decode_rollout, decode_task  # noqa: E402
from trainer import batching  # noqa: E402
from trainer.bootstrap import sft_pairs  # noqa: E402
from trainer.learner import LearnerSpec, recompute, rl_grads  # noqa: E402
from trainer.optim import make_optimizer  # noqa: E402
from trainer.replay_controller import Admitted  # noqa: E402
from trainer.state import create_state  # noqa: E402

DTYPES = ("float32", "bfloat16")


def _state(config, hf: str, mesh, dtype: str):
    """The train state of the checkpoint (f32 masters) and its layout with ``dtype`` compute."""
    # The compute dtype lives in the model's config (its activations) as well as in the layout.
    model, cfg = models.load(hf, dtype="float32", mesh=mesh, overrides={"dtype": dtype})
    optimizer, _ = make_optimizer(config.trainer)
    state, layout = create_state(model, cfg, mesh, optimizer, seed=0, with_value_head=False)
    assert layout.compute_dtype == jnp.dtype(dtype) and cfg.param_dtype == "float32"
    return state, layout


def _groups(store: str, n: int) -> list[Admitted]:
    """Up to n rollout groups left in the store with reward variance (the ones RL trains on)."""
    out = []
    for path in sorted(glob.glob(os.path.join(store, store_layout.ROLLOUTS, "*"))):
        with open(path, "rb") as f:
            group = decode_rollout(f.read())
        with open(os.path.join(store, store_layout.TASKS, os.path.basename(path)), "rb") as f:
            task = decode_task(f.read())
        if np.std(group.rewards) > 0:
            out.append(Admitted(task, group, 0))
    return out[:n]


def rl_gradients(config, hf: str, mesh, groups: list[Admitted]) -> dict:
    host = batching.rl_batch(groups, config.inference.max_seq_len)
    mask = host["mask"] > 0
    spec = LearnerSpec(micro_batches=1, logprob_chunk=config.model.logprob_chunk, remat=False,
                       compute_entropy=True, temperature=config.inference.temperature)
    loss = rl.build_loss(config.rl)
    grads, logps = {}, {}
    for dt in DTYPES:
        state, layout = _state(config, hf, mesh, dt)
        batch = {k: jnp.asarray(v) for k, v in host.items() if k != "weights_steps"}
        logp, _ = recompute(state["params"], batch, layout=layout, spec=spec)
        batch["proximal_logp"] = batch["ref_logp"] = logp  # on-policy, at the reference
        batch = rl.with_advantages(loss.settings, batch)
        g, _ = jax.jit(lambda p, b, layout=layout: rl_grads(p, b, layout=layout, spec=spec, loss=loss))(
            state["params"], batch)
        grads[dt], logps[dt] = [np.asarray(x).ravel() for x in jax.tree.leaves(g)], np.asarray(logp)[mask]
    a, b = np.concatenate(grads["float32"]), np.concatenate(grads["bfloat16"])
    per_leaf = [np.linalg.norm(y - x) / max(np.linalg.norm(x), 1e-30)
                for x, y in zip(grads["float32"], grads["bfloat16"], strict=True)]
    engine = host["behavior_logp"][mask]
    return {"groups": len(groups), "grad_cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
            "grad_rel_err": float(np.linalg.norm(b - a) / np.linalg.norm(a)),
            "grad_rel_err_leaf_min": float(min(per_leaf)), "grad_rel_err_leaf_max": float(max(per_leaf)),
            "logp_abs_diff_mean": float(np.abs(logps["bfloat16"] - logps["float32"]).mean()),
            **{f"engine_logp_abs_diff_mean_{dt}": float(np.abs(engine - logps[dt]).mean()) for dt in DTYPES}}


def sft_nll(config, hf: str, mesh) -> dict:
    config.tokenizer.kind, config.tokenizer.path = "sentencepiece", os.path.join(hf, "tokenizer.model")
    tok = tokenizer_lib.build(config, tempfile.mkdtemp(), corpus=None)
    task = tasks_lib.get_task(config.task)
    held_out = [(tok.encode_prompt(p.prompt), tok.encode(task.solution_text(p)) + [tok.eos_id])
                for p in task.eval_problems(config.task.num_eval, 0)]
    sets = {"train": sft_pairs(task, tok, 512, 12345), "held_out": held_out}
    out = {}
    for dt in DTYPES:
        state, layout = _state(config, hf, mesh, dt)
        spec = LearnerSpec(micro_batches=1, logprob_chunk=config.model.logprob_chunk, remat=False,
                           compute_entropy=False, temperature=1.0)
        for name, pairs in sets.items():
            b = batching.sft_batch(pairs, config.sft.max_len)
            batch = {k: jnp.asarray(v) for k, v in b.items()}
            logp, _ = recompute(state["params"], batch, layout=layout, spec=spec)
            out[f"sft_nll_{name}_{dt}"] = float(-(np.asarray(logp) * b["mask"]).sum() / b["mask"].sum())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a trainer.export directory of an arith_grpo run")
    ap.add_argument("--workdir", default="", help="the run's workdir (its store's rollout groups)")
    ap.add_argument("--groups", type=int, default=8)
    args = ap.parse_args()
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                              devices=jax.devices()[:1])
    out = {"checkpoint": args.checkpoint}
    if args.workdir:
        groups = _groups(os.path.join(args.workdir, "store"), args.groups)
        if not groups:
            raise SystemExit(f"no rollout group with reward variance left in {args.workdir}/store")
        out.update(rl_gradients(get_config(""), args.checkpoint, mesh, groups))
    out.update(sft_nll(get_config(""), args.checkpoint, mesh))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
