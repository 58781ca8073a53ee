"""A run's stages, in order: get a teacher, align it with MaskEmbed, probe teacher and aligned student.

Each stage leaves its result in the workdir, so running again with the same workdir reuses finished stages and
resumes an interrupted MaskEmbed run from its latest checkpoint. Writes `summary.json` and prints a table.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Optional

import jax
import numpy as np
from etils import epath

from lalign import allocator
from lalign import config as config_lib
from lalign import data as data_lib
from lalign import distributed
from lalign import files
from lalign import maskembed
from lalign import probe as probe_lib
from lalign import sharding
from lalign import validate
from lalign import workdir as workdir_lib
from lalign.checkpoints import hub
from lalign.checkpoints.load import checkpoint_normalization
from lalign.checkpoints.normalization import AUTO_NORMALIZATION, family_normalization
from lalign.checkpoints.records import RESOLVED, vit_record
from lalign.config import STAGES
from lalign.log import info
from lalign.models.vit import vit_from_config
from lalign.stats import t_interval
from lalign.teacher import get_teacher, teacher_source
from lalign.train import train_maskembed



def resolve_normalization(config) -> Optional[dict]:
    """Sets `config.data.normalization` where it is "" or "auto" (or absent, for a source of real images) to the
    teacher checkpoint's (`checkpoints.load.checkpoint_normalization`; for a random or pre-trained teacher, its
    config.model family's), as the reference takes it from the teacher's pretrained_cfg; a name set in the config
    wins. Logs one line; returns {"normalization", "source"}, or None for the embedded scenes (which have none)."""
    data = config.data
    if data.get("name") == "scenes":
        return None
    configured = data.get("normalization", "") or ""
    from_checkpoint = "pretrain" not in config.stages and config.init_from not in ("", "random")
    try:
        if from_checkpoint:
            stated = checkpoint_normalization(config.init_from, config.init_format or None)
        else:
            name, why = family_normalization(vit_from_config(config))
            stated = name, f"config.model: {why}"
    except (ValueError, FileNotFoundError):
        if configured in AUTO_NORMALIZATION:
            raise
        stated = None
    if configured not in AUTO_NORMALIZATION:
        other = f"; the teacher's would be '{stated[0]}' ({stated[1]})" if stated and stated[0] != configured else ""
        info(f"[data] normalization '{configured}' (config.data.normalization){other}")
        return {"normalization": configured, "source": "config.data.normalization"}
    with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
        data.normalization = stated[0]
    info(f"[data] normalization '{stated[0]}' from {stated[1]} (config.data.normalization sets another)")
    return {"normalization": stated[0], "source": stated[1]}


def resolved_record(config, teacher, normalization: Optional[dict]) -> dict:
    """What a workdir records beside config.json (`RESOLVED`): every field of the teacher and of the student its
    run builds (`maskembed.make_maskembed_model`), the normalization and image size, and where the teacher came
    from. `lalign.export` and `lalign.probe` read it before anything else (checkpoints/records.py)."""
    student = maskembed.make_maskembed_model(teacher, config.maskembed).student
    source = ({"path": "pretrain"} if "pretrain" in config.stages else
              {"path": "random"} if config.init_from == "random" else teacher_source(config))
    return {"teacher": vit_record(teacher), "student": vit_record(student),
            "data": {"image_size": config.data.image_size,
                     "normalization": (normalization or {}).get("normalization"),
                     "normalization_source": (normalization or {}).get("source")},
            "init_from": source}


def run(config, workdir: str) -> dict:
    """Runs `config`'s stages in `workdir`. Fields the config leaves out take their defaults (lalign/config.py)."""
    unknown = set(config.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"Unknown config.stages {sorted(unknown)}; choose from {STAGES}.")
    config_lib.complete(config)
    if "probe" in config.stages and "maskembed" not in config.stages:
        raise ValueError("The 'probe' stage compares the teacher with the aligned student, so it needs the "
                         "'maskembed' stage too (a finished MaskEmbed run is reused, not repeated). To probe one "
                         "backbone, use `python -m lalign.probe`.")
    distributed.check_same_config(config)  # before anything is written
    teacher_hub = None
    if "pretrain" not in config.stages and hub.is_remote(config.init_from):
        teacher_hub = hub.resolve(config.init_from)  # every host: process 0 downloads first, the commit is shared
        with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
            config.init_from = teacher_hub.path
    normalization = resolve_normalization(config)  # before the config is checked and saved: it records the name
    validate.check(as_given(config, teacher_hub), workdir, jax.device_count())
    if "maskembed" in config.stages:  # fail fast on a wrong or unreadable data path, before the workdir is made
        check_data(config)
    with workdir_lib.hold(workdir) as lock:  # one run per workdir (lalign/workdir.py)
        if lock is not None and lock.note:
            info(f"[workdir] {lock.note}")
        return _run(config, workdir, normalization, teacher_hub)


def check_data(config) -> None:
    """The MaskEmbed splits' sources can be built (the path exists, holds images, num_val fits) and, for an image
    folder, some of their sampled images decode."""
    for split in ("maskembed", "maskembed_val"):
        source = data_lib.image_source(config.data, split, seed=config.seed)
        try:
            if hasattr(source, "check_readable"):
                source.check_readable()
        finally:
            if hasattr(source, "close"):
                source.close()


def as_given(config, teacher_hub):
    """The config with init_from as the run was given it (a hub id, a bucket URL), not its local copy: what
    config.json keeps and a resumed run is compared with; resolved.json records the path and the commit."""
    if teacher_hub is None:
        return config
    given = config.copy_and_resolve_references()
    given.init_from = teacher_hub.source
    return given


def _run(config, workdir: str, normalization: Optional[dict] = None, teacher_hub=None) -> dict:
    _write(os.path.join(workdir, "config.json"), as_given(config, teacher_hub).to_json_best_effort(indent=2))
    hosts = f"{jax.process_count()} processes x {jax.local_device_count()}, " if jax.process_count() > 1 else ""
    info(f"[host] jax {jax.__version__}, {hosts}{jax.device_count()} {jax.default_backend()} device(s), "
         f"{allocator.describe()}")
    if jax.default_backend() == "cpu" and not allocator.loaded():
        info("[host] XLA:CPU steps run 1.3-2x faster with tcmalloc (Debian/Ubuntu: apt-get install "
             "libtcmalloc-minimal4; lalign/allocator.py)")
    times = {}
    t0 = time.time()
    teacher, teacher_params = get_teacher(config, workdir)
    record = resolved_record(config, teacher, normalization)
    if teacher_hub is not None:
        record["init_from"].update(source=teacher_hub.source, revision=teacher_hub.revision)
    validate.check_resolved(record, workdir)  # a resumed run's checkpoints were trained as the same model
    _write(os.path.join(workdir, RESOLVED), json.dumps(record, indent=2))
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
    splits = None
    # Each host probes on its own devices (the same computation everywhere; process 0 writes the results).
    teacher_params, aligned_params = sharding.local_copy((teacher_params, aligned["params"]))
    backbones = {  # the probe package's own feature functions: what `python -m lalign.probe` measures
        "teacher": probe_lib.make_features_fn(teacher, teacher_params),
        "aligned": probe_lib.make_features_fn(aligned["model"].student, aligned_params["student"]),
    }
    out = {"probe": {}, "image": {}}
    for name, fn in backbones.items():
        saved = epath.Path(os.path.join(workdir, "probe", f"{name}.json"))
        res = json.loads(saved.read_text()) if saved.exists() else None
        if res is not None and res.get("key") == keys[name]:
            info(f"[probe] {name}: reusing {saved}")
        else:
            if splits is None:  # the probe CLI's splits of the run's data (the embedded scenes, the run's seed)
                splits, _ = probe_lib.probe_splits(config, config.data.image_size, teacher.patch_size[0],
                                                   config.data.get("normalization", ""), seed=config.seed)
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
    teacher = {"init_from": "pretrain" if "pretrain" in config.stages else config.init_from,
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
