"""Loading finished pipeline runs (read only) and grouping them by the config keys that differ between them."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import ml_collections

from lalign.checkpoints.load import load_any
from lalign.teacher import get_teacher
from lalign.pretrain import pretrain_teacher
from lalign.probe.metrics import probes_best_at_last_epoch

# Keys that do not define an experiment: replicates (seed) and bookkeeping.
IGNORED = ("seed", "quiet", "async_checkpointing", "log_every", "mesh", "sharding_rules", "init_format",
           "checkpoint_every")
METRICS = (  # (key, label): values in points (x100)
    ("teacher_patch", "teacher patch recall"), ("aligned_patch", "aligned patch recall"),
    ("delta_patch", "Δ patch (aligned − teacher)"), ("teacher_map", "teacher image mAP"),
    ("aligned_map", "aligned image mAP"), ("delta_map", "Δ image mAP"),
)


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def load_run(workdir: str) -> Optional[dict]:
    """{'name', 'path', 'config', 'flat', 'summary', 'metrics'} of a finished run, or None if it has no results
    yet (no summary.json nor probe/results.json)."""
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{workdir}: no config.json; is it a `python -m lalign.main` workdir?")
    with open(cfg_path) as f:
        config = json.load(f)
    summary = None
    for name in ("summary.json", os.path.join("probe", "results.json")):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            with open(path) as f:
                summary = json.load(f)
            if "probe" in summary:
                break
            summary = None
    if summary is None:
        return None
    probe, image = summary["probe"], summary.get("image", {})
    pts = lambda v: None if v is None else 100.0 * float(v)  # noqa: E731
    # A probe std over a single probe seed is no spread at all: shown as none.
    seed_std = lambda p: pts(p.get("macro_recall_std")) if len(p.get("macro_recall_per_seed", ())) > 1 else None  # noqa
    m = {
        "teacher_patch": pts(probe["teacher"]["macro_recall"]), "aligned_patch": pts(probe["aligned"]["macro_recall"]),
        "teacher_patch_probe_std": seed_std(probe["teacher"]), "aligned_patch_probe_std": seed_std(probe["aligned"]),
        "teacher_miou": pts(probe["teacher"].get("miou")), "aligned_miou": pts(probe["aligned"].get("miou")),
        "teacher_map": pts(image.get("teacher", {}).get("map")),
        "aligned_map": pts(image.get("aligned", {}).get("map")),
        "teacher_bg_map": pts(image.get("teacher", {}).get("background_token_map")),
        "aligned_bg_map": pts(image.get("aligned", {}).get("background_token_map")),
        "maskembed_val_loss": (summary.get("maskembed") or {}).get("best_val_loss"),
        # Probe runs that peaked at their last epoch (maybe not converged): a comparison is then suspect.
        "probes_best_at_last_epoch": {who: probes_best_at_last_epoch(probe[who])
                                      for who in ("teacher", "aligned")},
    }
    m["delta_patch"] = m["aligned_patch"] - m["teacher_patch"]
    m["delta_map"] = (None if m["teacher_map"] is None or m["aligned_map"] is None
                      else m["aligned_map"] - m["teacher_map"])
    return {"name": os.path.basename(os.path.normpath(workdir)), "path": os.path.abspath(workdir),
            "config": config, "flat": flatten(config), "summary": summary, "metrics": m}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED)


def differing_keys(runs: Sequence[dict]) -> list[str]:
    """Config keys whose values differ between runs (a key missing from some runs counts only if the runs that
    have it disagree), minus IGNORED."""
    keys = sorted({k for r in runs for k in r["flat"]})
    out = []
    for k in keys:
        if _ignored(k):
            continue
        values = {json.dumps(r["flat"][k], sort_keys=True) for r in runs if k in r["flat"]}
        if len(values) > 1:
            out.append(k)
    return out


def group_runs(runs: Sequence[dict], group_by: Optional[Sequence[str]] = None) -> tuple[list[str], dict]:
    """(keys, {label: [runs]}) in first-seen order; label 'k1=v1, k2=v2' or 'all runs'."""
    keys = list(group_by) if group_by else differing_keys(runs)
    groups: dict[str, list] = {}
    for r in runs:
        label = ", ".join(f"{k}={_fmt_value(r['flat'].get(k, '—'))}" for k in keys) or "all runs"
        groups.setdefault(label, []).append(r)
    return keys, groups


def _fmt_value(v) -> str:
    if isinstance(v, tuple):
        return "(" + ",".join(str(x) for x in v) + ")"
    return str(v)


def load_backbones(run: dict):
    """{'teacher': (ViT, params), 'aligned': (ViT, params)} of a run, read from its workdir (never written)."""
    workdir, config = run["path"], ml_collections.ConfigDict(run["config"])
    if "pretrain" in config.stages:
        if not os.path.isdir(os.path.join(workdir, "teacher", "params")):
            raise FileNotFoundError(f"{workdir}/teacher/params is missing (the report never trains a teacher).")
        teacher = pretrain_teacher(config, workdir)  # reuses WORKDIR/teacher/params
    else:
        teacher = get_teacher(config, workdir)
    best = os.path.join(workdir, "checkpoints", "best")
    steps = sorted(int(s) for s in os.listdir(best) if s.isdigit()) if os.path.isdir(best) else []
    if not steps:
        raise FileNotFoundError(f"{best} holds no checkpoint.")
    aligned = load_any(os.path.join(best, str(steps[-1])), "orbax", {}, quiet=True)
    return {"teacher": teacher, "aligned": aligned}
