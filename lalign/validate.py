"""The whole config checked before a run writes a byte or trains anything.

A typo'd sampler found after an hour of teacher pre-training, a negative learning rate that trains "normally", a
resumed run whose model or batch size differs from the checkpoints it continues: each is one clear error here,
naming every bad field at once, and the workdir is left exactly as it was.
"""
from __future__ import annotations

import json
import os

from etils import epath

from lalign import config as config_lib
from lalign import sharding, watch
from lalign.checkpoints.normalization import AUTO_NORMALIZATION
from lalign.checkpoints.records import COMPUTE_FIELDS, RESOLVED
from lalign.data.images import NORMALIZATION
from lalign.optim import peak_lr

# What a resumed run must share with the run that wrote the workdir's checkpoints. Everything else may change on
# resume: total_steps (extend a run), the logging/evaluation/checkpoint intervals, the mesh (resume on another
# slice), grad_accum_steps (the same step up to rounding), quiet, data paths.
RESUME_FIELDS = ("seed", "init_from", "model", "pretrain", "maskembed", "optimizer", "batch_size", "data.name",
                 "data.image_size", "data.normalization")


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def config_errors(config, num_devices: int) -> list[str]:
    """Every problem of `config` for a run on `num_devices` devices (empty: fine): each field against its rule
    (lalign/config.py), then what holds between fields."""
    errors = config_lib.errors(config)
    c = config_lib.completed(config)
    if c.data.get("name") != "scenes" and "normalization" in c.data:
        if c.data.normalization not in (*NORMALIZATION, *AUTO_NORMALIZATION):
            errors.append(f"config.data.normalization must be one of {sorted(NORMALIZATION)}, or '' / 'auto' for the "
                          f"teacher checkpoint's, got {c.data.normalization!r}")
    if not isinstance(c.data.get("image_size"), int) or c.data.image_size <= 0:
        errors.append(f"config.data.image_size must be a positive integer, got {c.data.get('image_size')!r}")
    errors += watch.config_errors(c)
    if errors:  # the mesh checks need sane sizes
        return errors
    try:  # the checks the step itself makes, on the mesh it will build
        data, fsdp, _ = sharding.mesh_shape(c.mesh, _mesh_devices(c, num_devices))
        sharding.check_batch(c.batch_size, data, fsdp, c.grad_accum_steps)
    except ValueError as e:
        return errors + [str(e).rstrip(".")]
    return errors


def _mesh_devices(config, num_devices: int) -> int:
    n = config.mesh.num_devices
    return min(n, num_devices) if n else num_devices


def resume_errors(config, workdir: str) -> list[str]:
    """Differences, in the fields a resumed run must keep, between `config` and the config of the run whose
    checkpoints are in `workdir` (empty when there are none)."""
    latest = epath.Path(workdir) / "checkpoints" / "latest"
    saved_path = epath.Path(workdir) / "config.json"
    if not latest.exists() or not any(p.name.isdigit() for p in latest.iterdir()) or not saved_path.exists():
        return []
    saved = json.loads(saved_path.read_text())
    new = json.loads(config.to_json_best_effort())
    out = []
    for field in RESUME_FIELDS:
        if field.split(".")[0] not in saved:
            continue  # a config.json from before the field existed
        a, b = _get(saved, field), _get(new, field)
        if field == "optimizer" and isinstance(a, dict) and isinstance(b, dict):
            a, b = _same_lr_fields(a, saved.get("batch_size"), b, new.get("batch_size"))
        if a != b:
            out.append(f"{field}: {json.dumps(a)} in the workdir's checkpoints, {json.dumps(b)} now")
    return out


def _same_lr_fields(saved: dict, saved_batch, new: dict, new_batch) -> tuple[dict, dict]:
    """A config.json written before `lr_base_batch` and `lr_scale_rule` existed ran with its lr as given: the
    two optimizer configs compared with those fields left out and the peak learning rate each gives in their
    place, so such a run resumes when its learning rate is unchanged."""
    missing = [k for k in ("lr_base_batch", "lr_scale_rule") if k in new and k not in saved]
    if not missing or not isinstance(saved.get("lr"), (int, float)):
        return saved, new
    drop = lambda o: {k: v for k, v in o.items() if k not in missing}  # noqa: E731
    return ({**drop(saved), "peak lr": peak_lr(saved, saved_batch)[0]},
            {**drop(new), "peak lr": peak_lr(new, new_batch)[0]})


def resolved_errors(saved: dict, new: dict) -> list[str]:
    """Differences between two records of what a run resolved (resolved.json: the student model, the data's
    normalization and image size) that checkpoints cannot be resumed across."""
    out = []
    for section, keys in (("student", None), ("data", ("normalization", "image_size"))):
        a, b = saved.get(section) or {}, new.get(section) or {}
        for k in keys or sorted(set(a) | set(b)):
            if k in COMPUTE_FIELDS or (k not in a and section == "student"):
                continue  # a compute choice, or a field from before it was recorded
            if a.get(k) != b.get(k):
                out.append(f"{section}.{k}: {json.dumps(a.get(k))} in the workdir's checkpoints, "
                           f"{json.dumps(b.get(k))} now")
    return out


def check_resolved(record: dict, workdir: str) -> None:
    """A resumed run must resolve to the model and data its checkpoints were trained with (the teacher checkpoint
    at init_from could have changed); raises one ValueError naming every difference."""
    latest = epath.Path(workdir) / "checkpoints" / "latest"
    saved_path = epath.Path(workdir) / RESOLVED
    if not latest.exists() or not any(p.name.isdigit() for p in latest.iterdir()) or not saved_path.exists():
        return
    changed = resolved_errors(json.loads(saved_path.read_text()), json.loads(json.dumps(record)))
    if changed:
        raise ValueError(f"{workdir} holds checkpoints of another model: " + "; ".join(changed) + f" (recorded in "
                         f"{saved_path}). Use a new --workdir, or the teacher and config that run had.")


def check(config, workdir: str, num_devices: int) -> None:
    """Raises one ValueError listing every problem; nothing has been written when it does."""
    errors = config_errors(config, num_devices)
    if errors:
        raise ValueError("Invalid config (nothing was written): " + "; ".join(errors) + ".")
    changed = resume_errors(config, workdir)
    if changed:
        raise ValueError(
            f"{workdir} holds checkpoints of another run: " + "; ".join(changed) + ". A resumed run keeps these "
            "fields (the data order, the model and the recipe depend on them); use a new --workdir, or the config "
            f"saved in {os.path.join(workdir, 'config.json')}.")
