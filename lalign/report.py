"""Turns finished pipeline runs into a report a person can read: a results table, bar plots and PCA maps.

    python -m lalign.report --workdirs runs/last_s0 runs/last_s1 runs/pen_s0 ... --out report/

Each workdir is a `python -m lalign.main` run (summary.json, config.json, probe/results.json, teacher/params,
checkpoints/best/STEP). Runs are grouped by the config keys whose values differ between them (e.g.
`maskembed.target_layer`), ignoring the seed and bookkeeping keys (`IGNORED`), or by `--group-by KEY ...`; the
runs of a group are its replicates. Writes into --out only (the workdirs are read, never written):

- `report.md`: per group, mean ± sample std (ddof=1) over runs of the patch probe macro recall (each run's value
  is already the mean over its probe seeds) and of the image-level linear probe mAP, for the frozen teacher and
  the aligned student, and the paired difference aligned - teacher; a per-run table; the figures below;
- `patch_macro_recall.png`, `image_map.png`: bars teacher vs aligned per group (error bars: std over runs; dots:
  the runs); `delta.png`: the paired differences aligned - teacher per group;
- `pca_<run>.png`: for the first run of each group (up to --pca-runs), held-out scenes (probe_test split) next to
  their ground truth and the first 3 PCA components of the teacher's and the aligned student's patch features as
  RGB over the patch grid. PCA is fit per backbone on the patches of --pca-fit held-out scenes. Locally semantic
  features colour each object's patches alike and differently from the background;
- `report.json`: the numbers behind the tables (with the paired statistics: `lalign.stats`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional, Sequence

import ml_collections
import numpy as np

from lalign import data as data_lib
from lalign import cli, files, log
from lalign.stats import t_interval
from lalign.checkpoints.load import load_any
from lalign.pipeline import get_teacher
from lalign.pretrain import pretrain_teacher
from lalign.probe.features import features_of, make_features_fn
from lalign.probe.metrics import probes_best_at_last_epoch

# Keys that do not define an experiment: replicates (seed) and bookkeeping.
IGNORED = ("seed", "quiet", "async_checkpointing", "log_every", "mesh", "sharding_rules", "init_format",
           "checkpoint_every")
METRICS = (  # (key, label): values in points (x100)
    ("teacher_patch", "teacher patch recall"), ("aligned_patch", "aligned patch recall"),
    ("delta_patch", "Δ patch (aligned − teacher)"), ("teacher_map", "teacher image mAP"),
    ("aligned_map", "aligned image mAP"), ("delta_map", "Δ image mAP"),
)


# ------------------------------------------------------------------------------------------------ loading runs
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


def stats(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """(mean, sample std (ddof=1; None for one value), n) over the values that are not None."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None), len(vals)


def paired_delta(runs: Sequence[dict], key: str = "delta_patch") -> dict:
    """The paired difference aligned - teacher over a group's runs (one per seed): its mean, 95% t-interval and
    the count of runs where the aligned student is ahead."""
    deltas = [r["metrics"][key] for r in runs if r["metrics"][key] is not None]
    return dict(t_interval(deltas), ahead=int(sum(d > 0 for d in deltas)))


def paired_test(a: Sequence[dict], b: Sequence[dict], key: str = "delta_patch") -> Optional[dict]:
    """Setting a against setting b on the seeds both have (their runs share those seeds' teachers): the mean of
    the per-seed differences a - b with its 95% t-interval and the two-sided paired t-test's p-value; None when
    fewer than two seeds are shared."""
    from scipy import stats as st

    by_seed = lambda runs: {r["config"].get("seed"): r["metrics"][key] for r in runs}  # noqa: E731
    da, db = by_seed(a), by_seed(b)
    seeds = sorted(s for s in set(da) & set(db) if da[s] is not None and db[s] is not None)
    if len(seeds) < 2:
        return None
    diffs = [da[s] - db[s] for s in seeds]
    out = dict(t_interval(diffs), seeds=seeds, ahead=int(sum(d > 0 for d in diffs)))
    out["p"] = float(st.ttest_rel([da[s] for s in seeds], [db[s] for s in seeds]).pvalue) if out["sd"] else None
    return out


def paired_comparisons(groups: dict) -> dict:
    """{label: paired_test(group, first group)} for every other group sharing at least two seeds with the first."""
    labels = list(groups)
    if len(labels) < 2:
        return {}
    base = groups[labels[0]]
    out = {label: paired_test(groups[label], base) for label in labels[1:]}
    return {label: c for label, c in out.items() if c is not None}


def _ci(c: dict, digits: int = 2) -> str:
    if c["mean"] is None:
        return "—"
    if c["low"] is None:
        return f"{c['mean']:+.{digits}f}"
    return f"{c['mean']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"


def _ms(mean, std, digits=2) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def summarize(groups: dict) -> list[dict]:
    rows = []
    for label, runs in groups.items():
        row = {"group": label, "n": len(runs), "runs": [r["name"] for r in runs]}
        for key, _ in METRICS:
            mean, std, _n = stats([r["metrics"][key] for r in runs])
            row[key] = {"mean": mean, "std": std}
        row["paired_delta_patch"] = paired_delta(runs)
        row["paired_delta_map"] = paired_delta(runs, "delta_map")
        row["maskembed_val_loss"] = stats([r["metrics"]["maskembed_val_loss"] for r in runs])[0]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _run_values(groups: dict, key: str) -> list[list[float]]:
    """Per group, the runs' values of one metric (missing ones left out)."""
    return [[r["metrics"][key] for r in runs if r["metrics"][key] is not None] for runs in groups.values()]


def _grouped_bars(groups: dict, series, ylabel: str, path: str, limits=None, zero_line: bool = False) -> None:
    """One bar per (group, series): mean over runs, error bar = sample std, each run as a dot.

    series: [(values per group, legend label, colour)], as `_run_values` gives them."""
    plt = _plt()
    labels = list(groups)
    x = np.arange(len(labels))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(labels) + 2), 4.2))
    for j, (vals, name, colour) in enumerate(series):
        means = [np.mean(v) if v else np.nan for v in vals]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
        pos = x + (j - 0.5) * width
        ax.bar(pos, means, width, yerr=stds, capsize=4, color=colour, alpha=0.85, label=name)
        for p, v in zip(pos, vals):
            ax.scatter(np.full(len(v), p), v, color="black", s=12, zorder=3)
    if limits is not None:
        ax.set_ylim(*limits)
    if zero_line:
        ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([_wrap(g) for g in labels], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bar_plot(groups: dict, metric: str, ylabel: str, path: str) -> None:
    """Teacher vs aligned bars per group (mean over runs, error bar = sample std), each run as a dot."""
    series = [(_run_values(groups, f"{who}_{metric}"), who, colour)
              for who, colour in (("teacher", "#8c8c8c"), ("aligned", "#1f77b4"))]
    finite = [v for vals, _, _ in series for group in vals for v in group]
    limits = None
    if finite:  # zoom to the data (the axis does not start at 0)
        lo, hi = min(finite), max(finite)
        pad = max(2.0, 0.3 * (hi - lo))
        limits = (max(0.0, lo - pad), min(100.0, hi + pad))
    _grouped_bars(groups, series, ylabel, path, limits=limits)


def delta_plot(groups: dict, path: str) -> None:
    """Paired differences aligned - teacher per group (patch recall and image mAP), each run as a dot: the seed
    noise of the teacher cancels out of these."""
    series = [(_run_values(groups, "delta_patch"), "Δ patch macro recall", "#1f77b4"),
              (_run_values(groups, "delta_map"), "Δ image mAP", "#ff7f0e")]
    _grouped_bars(groups, series, "aligned − teacher (points)", path, zero_line=True)


def _wrap(text: str, width: int = 28) -> str:
    parts, line = [], ""
    for piece in text.split(", "):
        if line and len(line) + len(piece) + 2 > width:
            parts.append(line)
            line = piece
        else:
            line = f"{line}, {piece}" if line else piece
    parts.append(line)
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------------- PCA maps
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


def pca_rgb(features: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """features (..., D) -> (..., 3) in [0, 1]: projection on the top-3 principal components of `fit` (n, D),
    each scaled by its 1st..99th percentile over `fit`."""
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    comps = vt[:3]
    ref = (fit - mean) @ comps.T
    lo, hi = np.percentile(ref, 1, axis=0), np.percentile(ref, 99, axis=0)
    proj = (features - mean) @ comps.T
    return np.clip((proj - lo) / np.maximum(hi - lo, 1e-8), 0.0, 1.0)


def pca_figure(run: dict, path: str, num_images: int = 4, num_fit: int = 64) -> None:
    """Held-out scenes | ground truth | teacher PCA | aligned PCA, one row per scene."""
    config = ml_collections.ConfigDict(run["config"])
    if config.data.get("name") != "scenes":
        raise ValueError(f"PCA maps need the scenes data set; this run uses {config.data.get('name')!r}.")
    examples = data_lib.image_source(config.data, "probe_test", seed=config.seed).examples(0, max(num_fit, num_images))
    images = examples["image"]
    backbones = load_backbones(run)
    maps = {}
    for who, (model, params) in backbones.items():
        fn = make_features_fn(model, params)
        feats = features_of(fn, images)
        g = int(math.isqrt(feats.shape[1]))
        rgb = pca_rgb(feats[:num_images], feats[:num_fit].reshape(-1, feats.shape[-1]))
        maps[who] = rgb.reshape(num_images, g, g, 3)

    plt = _plt()
    m = run["metrics"]
    cols = ["scene (held out)", "ground truth",
            f"teacher PCA\n(patch recall {m['teacher_patch']:.1f})",
            f"aligned PCA\n(patch recall {m['aligned_patch']:.1f})"]
    fig, axes = plt.subplots(num_images, 4, figsize=(8.4, 2.1 * num_images + 0.4), squeeze=False)
    seg = examples.get("segmentation")
    for i in range(num_images):
        axes[i, 0].imshow(np.clip((images[i] + 1) / 2, 0, 1))
        if seg is not None:  # background light grey, class c (stored as c + 1) in tab10 colour c mod 10
            from matplotlib.colors import ListedColormap

            colours = [(0.88, 0.88, 0.88)] + [plt.get_cmap("tab10")(c % 10)[:3] for c in range(int(seg.max()) + 1)]
            axes[i, 1].imshow(seg[i], cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1,
                              interpolation="nearest")
        axes[i, 2].imshow(maps["teacher"][i], interpolation="nearest")
        axes[i, 3].imshow(maps["aligned"][i], interpolation="nearest")
        for j in range(4):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(cols[j], fontsize=9)
    fig.suptitle(run["name"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- the report
def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_report(workdirs: Sequence[str], out: str, group_by: Optional[Sequence[str]] = None, pca: bool = True,
                 pca_runs: int = 4, pca_images: int = 4, pca_fit: int = 64, title: str = "lalign report") -> dict:
    runs, unfinished = [], []
    for w in workdirs:
        r = load_run(w)
        (runs if r is not None else unfinished).append(r if r is not None else w)
    if not runs:
        raise ValueError(f"None of the workdirs has results yet (summary.json or probe/results.json): {workdirs}.")
    names = [r["name"] for r in runs]
    for r in runs:  # unique names: parent/name where basenames collide
        if names.count(r["name"]) > 1:
            r["name"] = os.path.join(os.path.basename(os.path.dirname(r["path"])), r["name"])
    os.makedirs(out, exist_ok=True)
    keys, groups = group_runs(runs, group_by)
    rows = summarize(groups)

    figures = {}
    bar_plot(groups, "patch", "patch macro recall @0.5 (points)", os.path.join(out, "patch_macro_recall.png"))
    figures["patch"] = "patch_macro_recall.png"
    if any(r["metrics"]["teacher_map"] is not None for r in runs):
        bar_plot(groups, "map", "image-level linear probe mAP (points)", os.path.join(out, "image_map.png"))
        figures["map"] = "image_map.png"
    delta_plot(groups, os.path.join(out, "delta.png"))
    figures["delta"] = "delta.png"
    pca_figs, pca_notes = [], []
    if pca:
        for label, members in list(groups.items())[:pca_runs]:
            run = members[0]
            fname = f"pca_{_safe_name(run['name'])}.png"
            try:
                pca_figure(run, os.path.join(out, fname), pca_images, pca_fit)
                pca_figs.append((label, run["name"], fname))
            except (FileNotFoundError, ValueError) as e:
                pca_notes.append(f"{run['name']}: no PCA map ({e})")
                log.note(f"[report] {pca_notes[-1]}")

    md = [f"# {title}", ""]
    md.append(f"{len(runs)} run(s) in {len(groups)} group(s)"
              + (f", grouped by {', '.join(f'`{k}`' for k in keys)}" if keys else "")
              + ". Each run's patch recall is the mean over its probe seeds; the table gives mean ± sample std "
                "(ddof=1) over the runs of a group, in points (×100). Δ is the paired difference aligned − teacher "
                "within each run (one per seed); 'Δ patch, 95% CI' is its mean with a Student-t interval over the "
                "runs, and 'ahead' counts the runs where the aligned student beats its teacher.")
    if unfinished:
        md.append("")
        md.append("Not finished (left out): " + ", ".join(f"`{w}`" for w in unfinished) + ".")
    md += ["", "## Results", "",
           "| group | runs | teacher patch recall | aligned patch recall | Δ patch | teacher image mAP | "
           "aligned image mAP | Δ image mAP | Δ patch, 95% CI | ahead |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        cells = [_ms(row[k]["mean"], row[k]["std"]) for k, _ in METRICS]
        d = row["paired_delta_patch"]
        md.append(f"| {row['group']} | {row['n']} | " + " | ".join(cells)
                  + f" | {_ci(d)} | {d['ahead']} of {d['n']} |")
    comparisons = paired_comparisons(groups)
    if comparisons:
        base = next(iter(groups))
        md += ["", f"### Paired against `{base}`", "",
               f"Per seed, Δ patch of the group minus Δ patch of `{base}` (runs of one seed share their teacher): "
               "the mean with its 95% t-interval, the seeds where the group is ahead, and the two-sided paired "
               "t-test's p-value.", "",
               "| group | seeds | Δ patch − baseline's, 95% CI | ahead | p |", "|---|---:|---:|---:|---:|"]
        for label, c in comparisons.items():
            p = "—" if c["p"] is None else f"{c['p']:.3g}"
            md.append(f"| {label} | {c['n']} | {_ci(c)} | {c['ahead']} of {c['n']} | {p} |")
    if any(r["metrics"]["teacher_bg_map"] is not None for r in runs):
        md += ["", "### Globalness: image labels from one background token", "",
               "mAP of a linear probe on the one unlabelled patch per image farthest from every object "
               "(`lalign.probe.background_tokens`): high = that token carries the whole image (global), lower = "
               "local. Mean ± std over the runs that have it.", "",
               "| group | teacher | aligned |", "|---|---:|---:|"]
        for label, members in groups.items():
            cells = [_ms(*stats([r["metrics"][f"{who}_bg_map"] for r in members])[:2])
                     for who in ("teacher", "aligned")]
            md.append(f"| {label} | {cells[0]} | {cells[1]} |")
    md += ["", "### Per run", "",
           "| run | group | seed | teacher patch recall | aligned patch recall | Δ patch | teacher mAP | aligned mAP "
           "| MaskEmbed best val loss |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    label_of = {id(r): label for label, members in groups.items() for r in members}
    for r in runs:
        m = r["metrics"]
        loss = m["maskembed_val_loss"]
        md.append(f"| {r['name']} | {label_of[id(r)]} | {r['config'].get('seed', '—')} | "
                  f"{_ms(m['teacher_patch'], m['teacher_patch_probe_std'])} | "
                  f"{_ms(m['aligned_patch'], m['aligned_patch_probe_std'])} | {m['delta_patch']:+.2f} | "
                  f"{_ms(m['teacher_map'], None)} | {_ms(m['aligned_map'], None)} | "
                  f"{'—' if loss is None else f'{loss:.4f}'} |")
    md += ["", "(± in the per-run table: std over that run's probe seeds.)"]
    at_last = []
    for r in runs:
        who = [name for name, idx in r["metrics"]["probes_best_at_last_epoch"].items() if idx]
        if who:
            at_last.append(f"`{r['name']}` ({', '.join(who)})")
    if at_last:
        md += ["", "**Probe convergence:** the best validation epoch was the last epoch in " + ", ".join(at_last)
               + ". Those probes may still have been learning; a Δ between them can reflect how fast each "
                 "backbone's features are fitted rather than what they hold. Rerun with more `probe.epochs`."]
    md += ["", "## Plots", "",
           "Bars: mean over the runs of a group; error bars: sample std; dots: single runs. The y axis is zoomed "
           "to the data (it does not start at 0).", "", f"![patch macro recall]({figures['patch']})", ""]
    if "map" in figures:
        md += [f"![image mAP]({figures['map']})", ""]
    md += ["Paired differences (aligned − teacher, within each run; the teacher's seed-to-seed spread cancels):",
           "", f"![aligned minus teacher]({figures['delta']})", ""]
    if pca_figs or pca_notes:
        md += ["## PCA maps of patch features", "",
               "Held-out scenes (probe_test split), their ground truth, and the first three principal components of "
               "each backbone's final patch features as RGB over the patch grid (PCA fit per backbone on the "
               f"patches of {pca_fit} held-out scenes). Local features give each object's patches one colour, "
               "distinct from the background; global features colour the whole grid alike.", ""]
        for label, name, fname in pca_figs:
            md += [f"**{name}** ({label})", "", f"![PCA {name}]({fname})", ""]
        md += [f"- {n}" for n in pca_notes]
    text = "\n".join(md).rstrip() + "\n"
    files.write_text(os.path.join(out, "report.md"), text)
    data = {"group_keys": keys, "groups": rows, "paired_against_first_group": comparisons, "unfinished": unfinished,
            "runs": [{"name": r["name"], "path": r["path"], "group": label_of[id(r)], **r["metrics"]} for r in runs],
            "figures": {**figures, "pca": [f for _, _, f in pca_figs]}}
    files.write_text(os.path.join(out, "report.json"), json.dumps(data, indent=2))
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lalign.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdirs", nargs="+", required=True, help="pipeline workdirs (read only)")
    p.add_argument("--out", required=True, help="report directory (report.md, PNGs, report.json)")
    p.add_argument("--group-by", nargs="*", default=None,
                   help="config keys (dotted, e.g. maskembed.target_layer) to group by; default: the keys that differ")
    p.add_argument("--no-pca", action="store_true", help="skip the PCA maps (no model is loaded)")
    p.add_argument("--pca-runs", type=int, default=4, help="PCA figures for the first run of up to this many groups")
    p.add_argument("--pca-images", type=int, default=4, help="held-out scenes per PCA figure")
    p.add_argument("--pca-fit", type=int, default=64, help="held-out scenes whose patches the PCA is fit on")
    p.add_argument("--title", default="lalign report")
    args = p.parse_args(argv)
    data = write_report(args.workdirs, args.out, args.group_by, not args.no_pca, args.pca_runs, args.pca_images,
                        args.pca_fit, args.title)
    log.info(f"[report] {len(data['runs'])} run(s), {len(data['groups'])} group(s) -> "
             f"{os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.returning("report", main))
