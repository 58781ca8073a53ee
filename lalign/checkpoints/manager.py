"""Orbax checkpoints of the train state: the latest (to resume) and the best by validation loss (to keep).

Layout under `DIR/checkpoints/`: `latest/<step>/` holds the whole train state (step, params, optimizer state and
the target normalization; the randomness of a step is a function of the seed and the step, so no PRNG key) of
the two newest saves; `best/<step>/` holds `{'params', 'step'}`
of the evaluation with the lowest validation loss: what the probe and export read, without a second copy of the
optimizer moments; `checksums/<latest|best>/<step>.json` records what each step held (`verify`);
`quarantine/<step>/` holds a latest step that failed verification, moved there whole with its record
(`checksums.json`) and why (`REASON.txt`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lalign.checkpoints import verify
from lalign.checkpoints.common import check_shapes
from lalign.files import absolute

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


@contextlib.contextmanager
def _quiet_libraries():
    """Orbax and tensorstore log every failed read at ERROR, pages of it for one damaged step; the step's verdict
    is reported instead (details at debug level)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL if previous < logging.CRITICAL else previous)
    try:
        yield
    finally:
        logging.disable(previous)


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir can be used: each one failed verification or could not be read."""


class Checkpoints:
    """Two orbax managers: `latest` (keeps the newest states, to resume) and `best` (the params of the lowest
    val_loss), each step verified (`lalign.checkpoints.verify`).

    save: refuses a state that is not all finite (nothing is written), then records the checksums of what it saves.
    restore_latest: the newest step whose arrays match their record; a step that does not (or cannot be read) is
    reported, array by array, and moved to `quarantine/`, and the one before it is tried (`keep_latest` steps are
    kept, so there is one to fall back to). `replicated`: a replicated sharding on the run's mesh, for the
    checksums' result.
    """

    def __init__(self, directory: str, keep_latest: int = 2, async_save: bool = True, replicated=None):
        directory = absolute(directory)
        self.root, self._replicated = directory, replicated
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
        record = verify.device_record(state, self._replicated)  # one pass over the state on its devices
        bad = verify.not_finite(record)
        if bad:
            raise FloatingPointError(
                f"The train state at step {step} is not finite ({len(bad)} of {len(record)} arrays, e.g. "
                f"{', '.join(bad[:3])}); it was not saved. {self.resume_note()}")
        self.latest.save(step, args=ocp.args.PyTreeSave(state), force=True, custom_metadata=verify.STEP_METADATA)
        verify.write(verify.record_path(self.root, "latest", step), step, record)
        self._prune_records("latest", self.latest.all_steps() + [step])
        if val_loss is None:
            return
        best = self.best_val_loss()
        if best is None or val_loss < best:  # a worse one would be deleted at once
            self.best.save(step, args=ocp.args.PyTreeSave(_best_item(state)), metrics={"val_loss": float(val_loss)},
                           force=True, custom_metadata=verify.STEP_METADATA)
            item = {k: v for k, v in record.items() if k == "step" or k.startswith("params/")}
            verify.write(verify.record_path(self.root, "best", step), step, item)
            self._prune_records("best", self.best.all_steps() + [step])

    def _prune_records(self, kind: str, keep) -> None:
        """Records of steps orbax deleted go: for latest, those older than every kept step; for best, those of
        steps it does not keep (the lowest loss, which an asynchronous save in flight can make an older step than
        the one just saved)."""
        if jax.process_index() != 0:
            return
        folder = epath.Path(self.root) / "checksums" / kind
        oldest = min(keep)
        for f in folder.glob("*.json") if folder.exists() else []:
            if f.stem.isdigit() and (int(f.stem) < oldest if kind == "latest" else int(f.stem) not in keep):
                f.unlink()

    def latest_step(self) -> Optional[int]:
        return self.latest.latest_step()

    def resume_note(self) -> str:
        """What a restart will do, for error messages, by the rule `restore_latest` follows: the newest step with a
        record (checked when it is read), or one an older lalign saved (unverified); a step saved with checksums
        whose record is missing is skipped."""
        for s in sorted(self.latest.all_steps(), reverse=True):
            if epath.Path(verify.record_path(self.root, "latest", s)).exists():
                return (f"A restart resumes from the newest checkpoint that verifies: step {s} under "
                        f"{self.latest.directory} was finite when saved, and its checksums are checked when it is "
                        f"read.")
            if not verify.saved_with_record(epath.Path(self.latest.directory) / str(s)):
                return (f"A restart resumes from step {s} under {self.latest.directory}, saved by an older lalign "
                        f"without checksums: restored unverified.")
        return "No checkpoint has been saved yet: a restart begins again from the teacher."

    def _check_model(self, step: int, saved, like) -> None:
        """A checkpoint of another model is a config error (raised), not damage: checked on its metadata."""
        if "params" in saved:  # checked here: orbax's own message gives the shapes but not the array
            try:
                check_shapes(saved["params"], like["params"], source="the checkpoint", what="this run's params")
            except ValueError as e:
                raise ValueError(
                    f"The checkpoint {self.latest.directory}/{step} does not match this run's model/optimizer state "
                    f"(was the workdir used with another config?). Use a new --workdir, or the config that wrote "
                    f"it.\n{e}") from None

    def _verified(self, manager, kind: str, step: int, args) -> tuple[Any, list[str]]:
        """(restored tree, problems): problems is empty when every array matches its record."""
        try:
            with _quiet_libraries():
                tree = manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - unreadable bytes surface as many error types
            logging.debug("restoring %s/%s", manager.directory, step, exc_info=True)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return None, [f"cannot be read ({type(e).__name__}: {first[:300]})"]
        try:
            expected = verify.read(verify.record_path(self.root, kind, step))
        except verify.RecordError as e:
            return None, [str(e)]
        if expected is None:
            # saved with a record: its loss is damage, not an old format
            if verify.saved_with_record(epath.Path(manager.directory) / str(step)):
                return None, [f"its checksum record {verify.record_path(self.root, kind, step)} is missing (the "
                              f"step was saved with one), so nothing says what it held"]
            warnings.warn(f"{manager.directory}/{step} has no checksum record (saved by an older lalign): "
                          f"restored unverified.", stacklevel=3)
            return tree, []
        return tree, verify.mismatches(expected, verify.device_record(tree, self._replicated))

    def _quarantine(self, step: int, reason: str) -> str:
        """Moves a latest step out of `latest/` (a rerun must be able to save that step again) to
        `quarantine/<step>` (`<step>-2`, ... when taken), with its record and REASON.txt. Never deleted: a read
        error may be transient (a flaky bucket), and params that verify can still be exported
        (`lalign.export --params-only`)."""
        folder = epath.Path(self.root) / "quarantine"
        dest, n = folder / str(step), 1
        while dest.exists():
            n += 1
            dest = folder / f"{step}-{n}"
        # every host has named the same destination before process 0 moves anything
        ocp.multihost.sync_global_processes(f"lalign_quarantine_named_{step}")
        if jax.process_index() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            _move(epath.Path(self.latest.directory) / str(step), dest)
            record = epath.Path(verify.record_path(self.root, "latest", step))
            if record.exists():
                _move(record, dest / "checksums.json")
            (dest / "REASON.txt").write_text(
                f"{reason}\nWhere the cause was passing (a failed read), moving this folder back to "
                f"{self.latest.directory}/{step} and checksums.json to "
                f"{verify.record_path(self.root, 'latest', step)} makes the step resumable again.\n")
        ocp.multihost.sync_global_processes(f"lalign_quarantine_moved_{step}")
        self.latest.reload()
        return str(dest)

    def restore_latest(self, like) -> Any:
        """The newest state that verifies, shaped like `like`; a checkpoint of another model is a clear error."""
        skipped = []
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                saved = getattr(self.latest.item_metadata(step), "tree", None) or {}
            except Exception as e:  # noqa: BLE001 - metadata that cannot be read: a damaged step
                state, problems = None, [f"its metadata cannot be read ({type(e).__name__}: {str(e)[:200]})"]
            else:
                self._check_model(step, saved, like)
                state, problems = self._verified(self.latest, "latest", step, _restore_args(like))
            if not problems:
                if skipped:
                    warnings.warn(f"Resuming from step {step}, the newest checkpoint that verifies; "
                                  + " ".join(skipped), stacklevel=2)
                return state
            # read whole and only other arrays differ: the params match their record
            params_ok = state is not None and not any(p.startswith("params/") for p in problems)
            what = f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}"
            dest = self._quarantine(step, f"Step {step} of {self.latest.directory} failed verification: "
                                          + "; ".join(problems))
            skipped.append(f"Step {step} under {self.latest.directory} failed verification and was moved to "
                           f"{dest}{' (its params verify)' if params_ok else ''}: {what}.")
        quarantine = os.path.join(self.root, "quarantine")
        raise CheckpointError(
            " ".join(skipped) + f" No checkpoint is left to resume from: a restart in this workdir begins again from "
            f"the teacher. The failed steps are kept under {quarantine} (each with REASON.txt); `python -m "
            f"lalign.export --input {quarantine}/STEP --params-only ...` exports a step's params where they verify "
            f"against its record. Or start again in a new --workdir.")

    def restore_best(self, like) -> Any:
        """{'params', 'step'} of the best evaluation, shaped like `like` (a train state, or that subset of one),
        verified against its record."""
        step = self.best.best_step()
        if step is None:
            raise FileNotFoundError(f"No best checkpoint under {self.best.directory}.")
        # partial: best checkpoints written before they were trimmed to `_best_item` hold the whole state.
        tree, problems = self._verified(self.best, "best", step, _restore_args(_best_item(like), partial=True))
        if problems:
            raise CheckpointError(f"The best checkpoint {self.best.directory}/{step} failed verification: "
                                  f"{'; '.join(problems[:5])}.")
        return tree

    def best_val_loss(self) -> Optional[float]:
        step = self.best.best_step()
        if step is None:
            return None
        metrics = self.best.metrics(step)
        return float(metrics["val_loss"]) if metrics and "val_loss" in metrics else None

    def wait(self):
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self):
        self.latest.close()
        self.best.close()


def _move(src: epath.Path, dst: epath.Path) -> None:
    """A rename; where the filesystem has none for a folder (a bucket), a copy and then the removal."""
    try:
        src.rename(dst)
        return
    except Exception:  # noqa: BLE001 - gfile and fsspec raise their own types for an unsupported rename
        if not src.is_dir():
            raise
    for f in src.rglob("*"):
        if not f.is_dir():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            f.copy(target)
    src.rmtree()


def save_params(path: str, params) -> None:
    """Saves a params pytree (e.g. a finished teacher) with orbax, synchronously. Written from host memory: on a
    multi-host run each host holds its own (identical) copy on its local devices, which orbax cannot save as
    jax.Arrays; every host still takes part in the save (orbax's barriers), process 0 writes."""
    with ocp.Checkpointer(_handler()) as ckptr:
        ckptr.save(absolute(path), args=ocp.args.PyTreeSave(jax.device_get(params)), force=True)


def restore_arrays(path: str, only: Optional[str] = None):
    """Any orbax pytree checkpoint as numpy arrays in host memory, whatever the devices and hosts that saved it
    (a pod's checkpoint read on one machine: orbax's default restore would rebuild the saving topology).
    `only`: that top-level subtree alone (`{only: ...}`), the other arrays not read."""
    with ocp.PyTreeCheckpointer() as ckptr, _quiet_libraries():  # (an item dir has no step metadata: a warning)
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        if only is not None:
            if not isinstance(tree, dict) or only not in tree:
                raise ValueError(f"{path} holds no {only!r}: its top-level entries are "
                                 f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}.")
            tree = {only: tree[only]}
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=tree if only is not None else None, restore_args=args, partial_restore=only is not None))


def restore_verified(path: str, params_only: bool = False):
    """An orbax tree as numpy arrays; a training checkpoint step is verified against its checksum record.
    `params_only`: `{'params': ...}` of a training checkpoint step alone, verified against the record's entries for
    it, whatever the rest of the step holds (a quarantined step whose optimizer state is damaged)."""
    path = absolute(path)
    if os.path.isdir(os.path.join(path, "default")):  # a CheckpointManager step dir
        path = os.path.join(path, "default")
    record = verify.for_step_dir(path)
    if params_only and record is None:
        raise ValueError(f"--params-only: {path} has no checksum record to verify its params against (a training "
                         f"checkpoint step has checksums/<latest|best>/STEP.json, a quarantined one checksums.json).")
    if record is None and verify.saved_with_record(os.path.dirname(path)):
        raise ValueError(f"{path} was saved with a checksum record, and the record is missing: it cannot be verified "
                         f"(treated as damaged, as a resuming run treats it). Use another step.")
    tree = restore_arrays(path, only="params" if params_only else None)
    if record is not None:
        try:
            expected = verify.read(record)
            if params_only and expected is not None:
                expected = {k: v for k, v in expected.items() if k.startswith("params/")}
            problems = verify.mismatches(expected, verify.host_record(tree))
            why = "Its bytes changed after it was saved; use another step."
        except verify.RecordError as e:
            problems, why = [str(e)], "Nothing says what the step held; use another step."
        if problems:
            raise ValueError(f"{path} failed verification against {record}: {'; '.join(problems[:5])}. {why}")
    return tree


def load_params(path: str, like=None):
    """Restores a params pytree saved by `save_params`; with `like`, shapes are checked against it."""
    path = absolute(path)
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"No params checkpoint at {path}.")
    if like is None:
        return restore_arrays(path)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, _abstract(like))
