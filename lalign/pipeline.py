"""A run's stages, in order: get a teacher, align it with MaskEmbed, probe teacher and aligned student.

Each stage leaves its result in the workdir, so running again with the same workdir reuses finished stages and
resumes an interrupted MaskEmbed run from its latest checkpoint. Writes `summary.json` and prints a table.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from lalign import allocator
from lalign import data as data_lib
from lalign import distributed
from lalign import files
from lalign import probe as probe_lib
from lalign import sharding
from lalign import validate
from lalign import workdir as workdir_lib
from lalign.checkpoints.common import to_layout
from lalign.checkpoints.load import POSEMB_RESIZE, fit_posemb, load_any
from lalign.log import info
from lalign.stats import t_interval
from lalign.pretrain import pretrain_teacher, vit_from_config
from lalign.train import train_maskembed

STAGES = ("pretrain", "maskembed", "probe")


def get_teacher(config, workdir: str):
    """(ViT, params) of the teacher: pre-trained here (demo) or read from `config.init_from` in any format the
    export tool reads (orbax params, big_vision npz, HF directory, timm safetensors; `config.init_format` names it
    where the path does not tell). `config.model` supplies what the checkpoint cannot (act, ln_eps, scan, ...)."""
    if "pretrain" in config.stages:
        return pretrain_teacher(config, workdir)
    if not config.get("init_from"):
        raise ValueError("config.init_from must name the teacher checkpoint when 'pretrain' is not a stage.")
    if config.init_from == "random":  # smoke tests and benchmarks only: nothing to align
        info("[teacher] init_from='random': a randomly initialized teacher (smoke tests, benchmarks)")
        model = vit_from_config(config, num_classes=None)
        size = config.data.image_size
        return model, jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, size, size, 3)))["params"]
    fields = {k: v for k, v in config.model.items() if v is not None and v != ""}
    scan = fields.pop("scan", None)
    model, params = load_any(config.init_from, config.get("init_format") or None, fields)
    if scan is not None and scan != model.scan:  # e.g. a per-block npz into a scanned (memory-lean) model
        model, params = model.clone(scan=scan), to_layout(params, scan)
    for field in ("remat_policy", "attention_impl"):  # compute choices no checkpoint records
        if fields.get(field) not in (None, "") and getattr(model, field) != fields[field]:
            model = model.clone(**{field: fields[field]})
    params = fit_posemb(model, params, config.data.image_size, config.get("init_posemb_resize") or POSEMB_RESIZE[0])
    info(f"[teacher] {config.init_from}: ViT width {model.width}, depth {model.depth}, pool {model.pool_type}")
    return model, params


def run(config, workdir: str) -> dict:
    unknown = set(config.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"Unknown config.stages {sorted(unknown)}; choose from {STAGES}.")
    if "probe" in config.stages and "maskembed" not in config.stages:
        raise ValueError("The 'probe' stage compares the teacher with the aligned student, so it needs the "
                         "'maskembed' stage too (a finished MaskEmbed run is reused, not repeated). To probe one "
                         "backbone, use `python -m lalign.probe`.")
    distributed.check_same_config(config)  # before anything is written
    validate.check(config, workdir, jax.device_count())
    with workdir_lib.hold(workdir) as lock:  # one run per workdir (lalign/workdir.py)
        if lock is not None and lock.note:
            info(f"[workdir] {lock.note}")
        return _run(config, workdir)


def _run(config, workdir: str) -> dict:
    if "maskembed" in config.stages:  # fail fast on a wrong data path, before writing or loading a large teacher
        data_lib.image_source(config.data, "maskembed", seed=config.seed)
    _write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    hosts = f"{jax.process_count()} processes x {jax.local_device_count()}, " if jax.process_count() > 1 else ""
    info(f"[host] jax {jax.__version__}, {hosts}{jax.device_count()} {jax.default_backend()} device(s), "
         f"{allocator.describe()}")
    if jax.default_backend() == "cpu" and not allocator.loaded():
        info("[host] XLA:CPU steps run 1.3-2x faster with tcmalloc (Debian/Ubuntu: apt-get install "
             "libtcmalloc-minimal4; lalign/allocator.py)")
    times = {}
    t0 = time.time()
    teacher, teacher_params = get_teacher(config, workdir)
    times["teacher_s"] = time.time() - t0
    summary = {"workdir": files.absolute(workdir), "seed": config.seed}

    if "maskembed" in config.stages:
        t0 = time.time()
        result = train_maskembed(config, workdir, teacher, teacher_params)
        times["maskembed_s"] = time.time() - t0
        summary["maskembed"] = {k: result[k] for k in ("best_val_loss", "best_step", "target_std", "step")}

    if "probe" in config.stages:
        t0 = time.time()
        summary.update(run_probes(config, workdir, teacher, teacher_params, result))
        times["probe_s"] = time.time() - t0
    summary["runtime_s"] = times
    _write(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    print_table(summary)
    return summary


def run_probes(config, workdir: str, teacher, teacher_params, aligned) -> dict:
    """Probes the frozen teacher and the aligned student (best checkpoint) on the held-out probe splits.

    Each backbone's result is saved as it finishes (`probe/teacher.json`, `probe/aligned.json`, with the probe
    config and seed they were computed with) and reused when both match: an interrupted probe stage resumes, and
    runs that share a teacher (ablations) can share its probe by copying `teacher/` and `probe/teacher.json`
    (`backbone_identities` says when a result belongs to this run's backbone)."""
    path = os.path.join(workdir, "probe", "results.json")  # written for people; reuse goes by the keyed files
    pcfg = config.probe
    common = {"probe": pcfg.to_dict(), "data": config.data.to_dict(), "seed": config.seed}
    keys = {name: json.loads(json.dumps({**common, "backbone": identity}))  # tuples -> lists, as read back
            for name, identity in backbone_identities(config, aligned["best_step"]).items()}
    sizes = {"train": ("probe_train", pcfg.num_train), "val": ("probe_val", pcfg.num_val),
             "test": ("probe_test", pcfg.num_test)}
    splits = None
    backbone = teacher.clone(pool_type="none", num_classes=None, class_token=teacher.has_class_token)
    model = aligned["model"]
    # Each host probes on its own devices (the same computation everywhere; process 0 writes the results).
    teacher_params, aligned_params = sharding.local_copy((teacher_params, aligned["params"]))
    prefix = teacher.num_prefix_tokens
    backbones = {  # images -> patch tokens after the final norm, prefix tokens dropped
        "teacher": jax.jit(lambda x: backbone.apply({"params": teacher_params}, x)[1]["encoded"][:, prefix:]),
        "aligned": jax.jit(lambda x: model.features(aligned_params, x)[:, prefix:]),
    }
    out = {"probe": {}, "image": {}}
    for name, fn in backbones.items():
        saved = epath.Path(os.path.join(workdir, "probe", f"{name}.json"))
        res = json.loads(saved.read_text()) if saved.exists() else None
        if res is not None and res.get("key") == keys[name]:
            info(f"[probe] {name}: reusing {saved}")
        else:
            if splits is None:
                splits = {key: probe_lib.array_split(key, f"scenes/{split} seed {config.seed} ({n})",
                                                     data_lib.image_source(config.data, split,
                                                                           seed=config.seed).examples(0, n))
                          for key, (split, n) in sizes.items()}
            t0 = time.time()
            grid = config.data.image_size // teacher.patch_size[0]
            res = probe_lib.evaluate_backbone(fn, splits, grid * grid, teacher.width, teacher.num_heads, pcfg,
                                              features_cfg={"batch_size": 256}, what=f"probe {name}")
            res = {"key": keys[name], "patch": res["patch"], "image": res["image"], "seconds": time.time() - t0}
            _write(str(saved), json.dumps(res, indent=2))
        out["probe"][name], out["image"][name] = res["patch"], res["image"]
        info(f"[probe] {name}: patch macro recall {res['patch']['macro_recall']:.4f} "
             f"(seeds {np.round(res['patch']['macro_recall_per_seed'], 4).tolist()}), "
             f"image mAP {res['image']['map']:.4f}, background-token mAP "
             f"{res['image'].get('background_token_map', float('nan')):.4f}  [{res['seconds']:.0f}s]")
        warning = probe_lib.convergence_warning(res["patch"], name)
        if warning:
            info(f"[probe] {warning}")
    _write(path, json.dumps(out, indent=2))
    return out


# Model fields that change how a network is computed, not what it computes.
_COMPUTE_ONLY = ("attention_impl", "remat_policy", "scan")


def backbone_identities(config, aligned_step) -> dict[str, dict]:
    """What identifies the teacher and the aligned student for a saved probe result: where the teacher came
    from (checkpoint path, or its pre-training config) and, for the student, the MaskEmbed settings and the
    checkpoint step probed. A result copied from another run is reused only if these match."""
    teacher = {"init_from": "pretrain" if "pretrain" in config.stages else config.get("init_from", ""),
               "pretrain": config.pretrain.to_dict() if "pretrain" in config.stages else None,
               "model": {k: v for k, v in config.model.to_dict().items() if k not in _COMPUTE_ONLY}}
    aligned = {"teacher": teacher, "maskembed": config.maskembed.to_dict(), "optimizer": config.optimizer.to_dict(),
               "total_steps": config.total_steps, "batch_size": config.batch_size, "step": aligned_step}
    return {"teacher": teacher, "aligned": aligned}


def _write(path: str, text: str) -> None:
    """Writes a small text file (local or gs://) once: on process 0 of a multi-host run."""
    if jax.process_index() == 0:
        files.write_text(path, text)


def print_table(summary: dict) -> None:
    if "probe" not in summary or jax.process_index() != 0:
        return
    rows = [("", "patch macro recall", "patch mIoU", "image mAP")]
    for name in ("teacher", "aligned"):
        p, i = summary["probe"][name], summary["image"][name]
        rows.append((name, f"{p['macro_recall']:.4f} ± {p['macro_recall_std']:.4f}", f"{p['miou']:.4f}",
                     f"{i['map']:.4f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    info("\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows))
    per_seed = [summary["probe"][who].get("macro_recall_per_seed") or [] for who in ("teacher", "aligned")]
    if len(per_seed[0]) == len(per_seed[1]) > 1:  # the same probe seeds for both: paired
        c = t_interval([100 * (a - t) for t, a in zip(*per_seed)])
        info(f"aligned - teacher patch macro recall: {c['mean']:+.2f} points, 95% CI [{c['low']:+.2f}, "
             f"{c['high']:+.2f}] over {c['n']} probe seeds (probe noise only; over run seeds: python -m "
             f"lalign.report)")
