"""Orbax checkpoints of the whole trainer state: one sharded pytree plus named JSON items.

A checkpoint for step ``s`` lives in ``<workdir>/checkpoints/<s>/`` and holds

- ``state``: an arbitrary pytree of (sharded) jax arrays -- params, optimizer state, step --
  written with ``ocp.args.StandardSave``;
- one JSON item per name in ``json_items`` (grain iterator state, controller state, ...),
  written with ``ocp.args.JsonSave``.

Commit semantics (a restart resumes only from a completely written checkpoint): orbax writes
into a temporary directory and renames it only when every item is complete, so a step is
*committed* once its finalize finished. This class tracks that explicitly: ``save`` returns as
soon as the device->host copy is done (async), ``committed_steps()`` / ``latest_step()`` report
only steps whose write finished, and callbacks registered with ``on_commit`` run, in the
trainer's thread, for every step that became committed -- the controller uses that to delete
replay records the checkpoint covers. A commit is noticed at the next ``save``, ``wait``,
``poll`` or ``committed_steps`` call (never from the background thread, so callbacks need no
locking). Every host runs the same calls in the same order (orbax saves are collective); only
the primary host should act on callbacks that touch shared storage. On several hosts, host-local
leaves (single-device arrays such as a step counter made outside jit, typed PRNG keys) are saved
as replicated global arrays (orbax rejects them otherwise); give them a global sharding (e.g.
``NamedSharding(mesh, P())``) when restoring.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rlax_tpu.tree import path_str

log = logging.getLogger(__name__)

STATE_ITEM = "state"
# Top-level state leaves that older checkpoints hold and the train state no longer has (an RNG key
# nothing read): a restore reads them alongside, replicated like ``step``, and drops them, so a
# run resumes across the change.
DROPPED_LEAVES = ("rng",)
CHECKPOINT_DIR = "checkpoints"


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree does not fit the restore target (another model or config)."""


class Checkpointer:
    """Saves and restores ``(state pytree, {name: json dict})`` at integer steps.

    Args:
      workdir: run directory (local path or ``gs://``); checkpoints go to ``<workdir>/checkpoints``.
      keep: how many newest checkpoints orbax keeps (older ones are deleted after a commit).
      async_save: write in a background thread after the device->host copy.
    """

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        directory = os.path.join(workdir, CHECKPOINT_DIR)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = directory
        self._manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )
        # Steps found on disk at start-up are committed: orbax lists only finalized directories.
        self._committed: list[int] = sorted(self._manager.all_steps())
        self._pending: int | None = None
        self._callbacks: list[Callable[[int], None]] = []

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: Any, json_items: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Starts saving ``state`` and ``json_items`` as step ``step``; returns True if it did.

        A step that already exists is skipped with a warning (orbax would return False
        silently); a step older than the newest checkpoint raises, because orbax would skip
        every later save too. ``force`` is passed to orbax (it never overwrites).
        """
        step = int(step)
        json_items = dict(json_items or {})
        for name in json_items:
            if name == STATE_ITEM or not name or "/" in name:
                raise ValueError(f"invalid JSON item name {name!r} (reserved or not a plain name)")
        self._poll(block=False)
        if step in self._manager.all_steps():
            log.warning("checkpoint for step %d already exists in %s: not saving it again",
                        step, self.directory)
            return False
        latest = self._manager.latest_step()
        if latest is not None and step < latest:
            raise ValueError(
                f"cannot save step {step}: a newer checkpoint (step {latest}) exists in "
                f"{self.directory}; orbax would skip this and every later save"
            )
        if jax.process_count() > 1:
            state = globalize_host_local(state)
        args = {STATE_ITEM: ocp.args.StandardSave(state)}
        args.update({name: ocp.args.JsonSave(value) for name, value in json_items.items()})
        # orbax would wait for the previous async save inside save() anyway; waiting here first
        # lets us record (and announce) its commit before the next one starts.
        self._poll(block=True)
        saved = self._manager.save(step, args=ocp.args.Composite(**args), force=force)
        if not saved:
            log.warning("orbax declined to save step %d in %s (save policy)", step, self.directory)
            return False
        self._pending = step
        if not self._manager.is_saving_in_progress():
            self._poll(block=True)
        return True

    def wait(self) -> None:
        """Blocks until the in-flight save (if any) is committed; re-raises its error."""
        self._poll(block=True)

    def poll(self) -> list[int]:
        """Non-blocking: notices a finished async save, runs callbacks; returns committed steps."""
        self._poll(block=False)
        return list(self._committed)

    def _poll(self, block: bool) -> None:
        if self._pending is None:
            return
        if not block and self._manager.is_saving_in_progress():
            return
        step, self._pending = self._pending, None
        self._manager.wait_until_finished()  # re-raises a failed background write
        self._committed = sorted(set(self._committed) | {step})
        on_disk = set(self._manager.all_steps())
        self._committed = [s for s in self._committed if s in on_disk]  # drop GC'd steps
        for callback in list(self._callbacks):
            callback(step)

    # ------------------------------------------------------------------ commit tracking
    def on_commit(self, callback: Callable[[int], None]) -> None:
        """Registers ``callback(step)``, called once for every step that becomes committed."""
        self._callbacks.append(callback)

    def committed_steps(self) -> list[int]:
        """Steps whose checkpoint is complete on storage, oldest first (non-blocking)."""
        return self.poll()

    def latest_step(self) -> int | None:
        """The newest committed step, or None. An interrupted write is never returned."""
        steps = self.poll()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ restoring
    def restore(self, step: int, target_state_abstract: Any,
                json_names: Iterable[str] = ()) -> tuple[Any, dict[str, Any]]:
        """Restores step ``step`` into the layout given by ``target_state_abstract``.

        Target leaves are ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (e.g. from
        ``jax.eval_shape`` plus shardings), so a checkpoint saved on one mesh restores onto
        any other mesh or a single device. Raises CheckpointMismatchError naming the leaf if
        the tree or a shape differs, and FileNotFoundError for an unknown step or JSON item.
        """
        step = int(step)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no committed checkpoint for step {step} in {self.directory} "
                f"(have {sorted(self._manager.all_steps())})"
            )
        json_names = list(json_names)
        step_dir = epath.Path(self._manager.directory) / str(step)
        for name in json_names:
            if not (step_dir / name).exists():
                raise FileNotFoundError(f"checkpoint step {step} has no JSON item {name!r} ({step_dir})")
        target, dropped = self._with_dropped_leaves(step, target_state_abstract)
        self._check_tree(step, target)
        args = {STATE_ITEM: ocp.args.StandardRestore(target)}
        args.update({name: ocp.args.JsonRestore() for name in json_names})
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        state = restored[STATE_ITEM]
        if dropped:
            state = {k: v for k, v in state.items() if k not in dropped}
        return state, {name: restored[name] for name in json_names}

    def _with_dropped_leaves(self, step: int, target: Any) -> tuple[Any, tuple[str, ...]]:
        """The restore target plus the DROPPED_LEAVES the checkpoint holds and the target lacks."""
        if not isinstance(target, dict) or "step" not in target:
            return target, ()
        metadata = ocp.StandardCheckpointHandler().metadata(self._manager.directory / str(step) / STATE_ITEM)
        stored = _shapes_by_path(getattr(metadata, "tree", metadata))
        extra = {k: stored[k] for k in DROPPED_LEAVES if k in stored and k not in target}
        if not extra:
            return target, ()
        sharding = target["step"].sharding
        more = {k: jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding) for k, (shape, dtype) in extra.items()}
        return {**target, **more}, tuple(more)

    def restore_params(self, step: int, target_model_abstract: Any) -> Any:
        """Only the policy's parameters (``state['params']['model']``) of step ``step``, into the
        layout of ``target_model_abstract`` (the optimizer state is not read)."""
        step = int(step)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.directory} "
                                    f"(have {sorted(self._manager.all_steps())})")
        item = {"params": {"model": target_model_abstract}}
        path = epath.Path(self._manager.directory) / str(step) / STATE_ITEM
        restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
        return restored["params"]["model"]

    def _check_tree(self, step: int, target: Any) -> None:
        handler = ocp.StandardCheckpointHandler()
        metadata = handler.metadata(self._manager.directory / str(step) / STATE_ITEM)
        stored = _shapes_by_path(getattr(metadata, "tree", metadata))
        wanted = _shapes_by_path(target, stored_form=True)
        missing = sorted(set(wanted) - set(stored))
        extra = sorted(set(stored) - set(wanted))
        where = f"checkpoint {self.directory}/{step}"
        if missing or extra:
            raise CheckpointMismatchError(
                f"{where} does not match the restore target: leaves missing from the checkpoint: "
                f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; leaves only in the checkpoint: "
                f"{extra[:10]}{' ...' if len(extra) > 10 else ''}"
            )
        for path in sorted(wanted):
            (s_shape, s_dtype), (w_shape, w_dtype) = stored[path], wanted[path]
            if s_shape is not None and tuple(s_shape) != tuple(w_shape):
                raise CheckpointMismatchError(
                    f"{where}: leaf {path!r} has shape {tuple(s_shape)} ({s_dtype}) in the checkpoint "
                    f"but the restore target expects {tuple(w_shape)} ({w_dtype})"
                )

    def close(self) -> None:
        """Waits for the in-flight save, then releases orbax's threads."""
        try:
            self._poll(block=True)
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def globalize_host_local(tree: Any) -> Any:
    """Turns host-local leaves into replicated global arrays (multi-host saves need global arrays).

    On several hosts orbax refuses single-device jax arrays (e.g. a step counter created with
    ``jnp.int32(s)`` outside jit). Every host holds the same value for such leaves (the trainer is
    one SPMD program), so they are saved as arrays replicated over all devices. Leaves that are
    already global (sharded over devices of several hosts) are returned unchanged.
    """
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("hosts",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def convert(leaf):
        if not isinstance(leaf, jax.Array) or not leaf.is_fully_addressable:
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = convert(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, replicated, lambda index: value[index])

    return jax.tree.map(convert, tree)


def _shapes_by_path(tree: Any, stored_form: bool = False) -> dict[str, tuple[Any, Any]]:
    """Maps 'a/b/0' -> (shape, dtype). ``stored_form`` maps typed PRNG keys to their uint32 data."""
    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in leaves:
        name = path_str(path)
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if stored_form and dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
            shape, dtype = data.shape, data.dtype
        out[name] = (shape, dtype)
    return out
