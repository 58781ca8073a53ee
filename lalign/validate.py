"""The whole config checked before a run writes a byte or trains anything.

A typo'd sampler found after an hour of teacher pre-training, a negative learning rate that trains "normally", a
resumed run whose model or batch size differs from the checkpoints it continues: each is one clear error here,
naming every bad field at once, and the workdir is left exactly as it was.
"""
from __future__ import annotations

import json
import math
import os

from etils import epath

from lalign import maskembed, sharding, watch
from lalign.checkpoints.load import AUTO_NORMALIZATION, COMPUTE_FIELDS, POSEMB_RESIZE, RESOLVED
from lalign.optim import LR_SCALE_RULES, peak_lr

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


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def config_errors(config, num_devices: int) -> list[str]:
    """Every problem of `config` for a run on `num_devices` devices (empty: fine)."""
    errors = []

    def need(ok, message):
        if not ok:
            errors.append(message)

    c = config
    need(_positive_int(c.total_steps), f"config.total_steps must be a positive integer, got {c.total_steps!r}")
    need(_positive_int(c.batch_size), f"config.batch_size must be a positive integer, got {c.batch_size!r}")
    need(_positive_int(c.get("log_every", 1)), f"config.log_every must be a positive integer, got "
                                               f"{c.get('log_every')!r}")
    for name in ("eval_every", "checkpoint_every"):
        need(_non_negative_int(c.get(name, 0) or 0), f"config.{name} must be 0 (off) or a positive integer, got "
                                                     f"{c.get(name)!r}")
    need(_positive_int(c.get("val_batches", 1)), f"config.val_batches must be a positive integer, got "
                                                 f"{c.get('val_batches')!r}")
    need((c.get("init_posemb_resize") or POSEMB_RESIZE[0]) in POSEMB_RESIZE,
         f"config.init_posemb_resize must be one of {POSEMB_RESIZE}, got {c.get('init_posemb_resize')!r}")
    accum = c.get("grad_accum_steps", 1) or 1
    need(_positive_int(accum), f"config.grad_accum_steps must be a positive integer, got {accum!r}")

    o = c.optimizer
    lr = o.get("lr")
    need(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0,
         f"config.optimizer.lr must be a positive number, got {lr!r}")
    need(0 <= (o.get("wd", 0.0) or 0.0), f"config.optimizer.wd must be >= 0, got {o.get('wd')!r}")
    for name in ("b1", "b2"):
        if name in o:
            need(0 <= o[name] < 1, f"config.optimizer.{name} must be in [0, 1), got {o[name]!r}")
    need(0 <= (o.get("grad_clip", 0) or 0), f"config.optimizer.grad_clip must be >= 0 (0: off), got "
                                            f"{o.get('grad_clip')!r}")
    need(_non_negative_int(o.get("warmup_steps", 0) or 0), f"config.optimizer.warmup_steps must be >= 0, got "
                                                           f"{o.get('warmup_steps')!r}")
    need(0 <= o.get("lr_min_ratio", 0.1) <= 1, f"config.optimizer.lr_min_ratio must be in [0, 1], got "
                                               f"{o.get('lr_min_ratio')!r}")
    need(_non_negative_int(o.get("lr_base_batch", 0) or 0), f"config.optimizer.lr_base_batch must be 0 (lr used "
                                                            f"at any batch) or the global batch size lr belongs "
                                                            f"to, got {o.get('lr_base_batch')!r}")
    need((o.get("lr_scale_rule") or "sqrt") in LR_SCALE_RULES, f"config.optimizer.lr_scale_rule must be one of "
                                                               f"{tuple(LR_SCALE_RULES)}, got "
                                                               f"{o.get('lr_scale_rule')!r}")

    m = c.maskembed
    need(m.sampler in maskembed.SAMPLERS, f"config.maskembed.sampler {m.sampler!r} is not one of "
                                          f"{maskembed.SAMPLERS}")
    need(m.loss in maskembed.LOSSES, f"config.maskembed.loss {m.loss!r} is not one of {maskembed.LOSSES}")
    if m.sampler == "bernoulli":
        need(0 < m.get("keep_prob", 0.5) <= 1, f"config.maskembed.keep_prob must be in (0, 1], got "
                                               f"{m.get('keep_prob')!r}")
    target = m.get("target_layer", "penultimate")
    need(target in ("penultimate", "last") or _positive_int(target),
         f"config.maskembed.target_layer must be 'penultimate', 'last' or a block number >= 1, got {target!r}")
    need(_positive_int(m.get("target_std_batches", 1)), f"config.maskembed.target_std_batches must be a positive "
                                                        f"integer, got {m.get('target_std_batches')!r}")
    need(_positive_int(m.get("decoder_depth", 2)), f"config.maskembed.decoder_depth must be a positive integer, "
                                                   f"got {m.get('decoder_depth')!r}")
    eps = m.get("decoder_ln_eps")
    need(eps is None or (isinstance(eps, (int, float)) and 0 < eps < 1),
         f"config.maskembed.decoder_ln_eps must be a small positive number or None (the teacher's), got {eps!r}")
    if "pretrain" in c.stages:
        for name in ("steps", "batch_size"):
            need(_positive_int(c.pretrain.get(name)), f"config.pretrain.{name} must be a positive integer, got "
                                                      f"{c.pretrain.get(name)!r}")
    need(_positive_int(c.data.get("image_size")), f"config.data.image_size must be a positive integer, got "
                                                  f"{c.data.get('image_size')!r}")
    if c.data.get("name") != "scenes" and "normalization" in c.data:
        from lalign.data.images import NORMALIZATION

        need(c.data.normalization in (*NORMALIZATION, *AUTO_NORMALIZATION),
             f"config.data.normalization must be one of {sorted(NORMALIZATION)}, or '' / 'auto' for the teacher "
             f"checkpoint's, got {c.data.normalization!r}")

    errors += watch.config_errors(c)
    if errors:  # the mesh checks need sane sizes
        return errors
    try:  # the checks the step itself makes, on the mesh it will build
        data, fsdp, _ = sharding.mesh_shape(c.get("mesh", {}), _mesh_devices(c, num_devices))
        sharding.check_batch(c.batch_size, data, fsdp, accum)
    except ValueError as e:
        return [str(e).rstrip(".")]
    return errors


def _mesh_devices(config, num_devices: int) -> int:
    n = int(config.get("mesh", {}).get("num_devices", 0) or 0)
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
