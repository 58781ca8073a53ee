"""Orbax checkpoints of the train state: the latest (to resume) and the best by validation loss (to keep).

Layout under `DIR/checkpoints/`: `latest/<step>/` holds the whole train state (params, optimizer, step, PRNG key
as raw key data so it restores on any backend); `best/<step>/` holds `{'params', 'step'}` of the evaluation with the
lowest validation loss: what the probe and export read, without a second copy of the optimizer moments.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from lalign.checkpoints.common import check_shapes

# Orbax's default (off GPU) writes every replicated array cooperatively: one slice per replica, each cut by its own
# small jitted program. That pays for large arrays on multi-host slices; for small ones the per-slice dispatch costs
# more than the write (a 240-array state on 8 CPU devices saved 2.5x slower with it). Arrays whose per-replica
# slice would be smaller than this are written whole by one replica.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 4 << 20


def _handler() -> ocp.PyTreeCheckpointHandler:
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)),
        (np.ndarray, th.NumpyHandler()), (np.number, th.ScalarHandler()), (int, th.ScalarHandler()),
        (float, th.ScalarHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _restore_args(like, partial: bool = False) -> ocp.args.PyTreeRestore:
    abstract = _abstract(like)
    return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                  partial_restore=partial)


def _best_item(state) -> dict:
    return {"params": state["params"], "step": state["step"]}


class Checkpoints:
    """Two orbax managers: `latest` (keeps the newest state) and `best` (keeps the params of the lowest val_loss)."""

    def __init__(self, directory: str, keep_latest: int = 1, async_save: bool = True):
        directory = os.path.abspath(directory) if "://" not in directory else directory
        opts = dict(enable_async_checkpointing=async_save, create=True)

        def hosts(name):
            # Both managers save the same step at once; orbax names its cross-host barriers after the step, so
            # without a prefix each other's barriers collide and a multi-host save hangs.
            return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)

        self.latest = ocp.CheckpointManager(
            os.path.join(directory, "latest"), item_handlers=_handler(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, multiprocessing_options=hosts("latest"),
                                                 **opts))
        self.best = ocp.CheckpointManager(
            os.path.join(directory, "best"), item_handlers=_handler(),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["val_loss"], best_mode="min",
                                                 keep_checkpoints_without_metrics=False,
                                                 multiprocessing_options=hosts("best"), **opts))

    def save(self, step: int, state, val_loss: Optional[float] = None):
        self.latest.save(step, args=ocp.args.PyTreeSave(state), force=True)
        if val_loss is None:
            return
        best = self.best_val_loss()
        if best is None or val_loss < best:  # a worse one would be deleted at once
            self.best.save(step, args=ocp.args.PyTreeSave(_best_item(state)), metrics={"val_loss": float(val_loss)},
                           force=True)

    def latest_step(self) -> Optional[int]:
        return self.latest.latest_step()

    def restore_latest(self, like) -> Any:
        """The newest state, shaped like `like`; a checkpoint of another model or optimizer is a clear error."""
        step = self.latest.latest_step()
        where = (f"The checkpoint {self.latest.directory}/{step} does not match this run's model/optimizer state "
                 f"(was the workdir used with another config?). Use a new --workdir, or the config that wrote it.")
        saved = getattr(self.latest.item_metadata(step), "tree", None) or {}
        if "params" in saved:  # checked here: orbax's own message gives the shapes but not the array
            try:
                check_shapes(saved["params"], like["params"], source="the checkpoint", what="this run's params")
            except ValueError as e:
                raise ValueError(f"{where}\n{e}") from None
        try:
            return self.latest.restore(step, args=_restore_args(like))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where} Orbax said: {str(e)[:1500]}") from e

    def restore_best(self, like) -> Any:
        """{'params', 'step'} of the best evaluation, shaped like `like` (a train state, or that subset of one)."""
        step = self.best.best_step()
        if step is None:
            raise FileNotFoundError(f"No best checkpoint under {self.best.directory}.")
        # partial: best checkpoints written before they were trimmed to `_best_item` hold the whole state.
        return self.best.restore(step, args=_restore_args(_best_item(like), partial=True))

    def best_val_loss(self) -> Optional[float]:
        step = self.best.best_step()
        if step is None:
            return None
        for info in self.best._checkpoints:  # orbax keeps metrics per checkpoint
            if info.step == step and info.metrics:
                return float(info.metrics["val_loss"])
        return None

    def wait(self):
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self):
        self.latest.close()
        self.best.close()


def save_params(path: str, params) -> None:
    """Saves a params pytree (e.g. a finished teacher) with orbax, synchronously. Written from host memory: on a
    multi-host run each host holds its own (identical) copy on its local devices, which orbax cannot save as
    jax.Arrays; every host still takes part in the save (orbax's barriers), process 0 writes."""
    with ocp.Checkpointer(_handler()) as ckptr:
        ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(jax.device_get(params)), force=True)


def restore_arrays(path: str):
    """Any orbax pytree checkpoint as numpy arrays in host memory, whatever the devices and hosts that saved it
    (a pod's checkpoint read on one machine: orbax's default restore would rebuild the saving topology)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def load_params(path: str, like=None):
    """Restores a params pytree saved by `save_params`; with `like`, shapes are checked against it."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No params checkpoint at {path}.")
    if like is None:
        return restore_arrays(path)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, _abstract(like))
