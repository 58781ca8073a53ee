"""The report as files: bar plots, PCA maps of patch features, report.md and report.json."""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np

from lalign import data as data_lib
from lalign import files, log
from lalign.probe.features import features_of, make_features_fn
from lalign.report.compute import paired_comparisons, pca_rgb, stats, summarize
from lalign.report.runs import METRICS, group_runs, load_backbones, load_run



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


def _plt():
    """pyplot on the Agg backend (files only, no display)."""
    import matplotlib  # heavy (seconds to import): only the figures need it, not `--help` nor report.json

    matplotlib.use("Agg")  # before pyplot is first imported
    import matplotlib.pyplot as plt  # heavy: as above

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
            from matplotlib.colors import ListedColormap  # heavy: matplotlib stays out of the module top (_plt)

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


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def load_runs(workdirs: Sequence[str]) -> tuple[list[dict], list[str]]:
    """(the finished runs, the workdirs without results yet); a run's name is its workdir's basename, or
    parent/basename where basenames collide."""
    runs, unfinished = [], []
    for w in workdirs:
        r = load_run(w)
        (runs if r is not None else unfinished).append(r if r is not None else w)
    if not runs:
        raise ValueError(f"None of the workdirs has results yet (summary.json or probe/results.json): {workdirs}.")
    names = [r["name"] for r in runs]
    for r in runs:
        if names.count(r["name"]) > 1:
            r["name"] = os.path.join(os.path.basename(os.path.dirname(r["path"])), r["name"])
    return runs, unfinished


def write_plots(groups: dict, runs: Sequence[dict], out: str) -> dict:
    """The bar plots into `out`: {'patch', 'map' (when some run has an image probe), 'delta'} -> file name."""
    figures = {}
    bar_plot(groups, "patch", "patch macro recall @0.5 (points)", os.path.join(out, "patch_macro_recall.png"))
    figures["patch"] = "patch_macro_recall.png"
    if any(r["metrics"]["teacher_map"] is not None for r in runs):
        bar_plot(groups, "map", "image-level linear probe mAP (points)", os.path.join(out, "image_map.png"))
        figures["map"] = "image_map.png"
    delta_plot(groups, os.path.join(out, "delta.png"))
    figures["delta"] = "delta.png"
    return figures


def write_pca_maps(groups: dict, out: str, pca_runs: int, pca_images: int, pca_fit: int
                   ) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The PCA figure of the first run of up to `pca_runs` groups: ([(group, run, file name)], [why a run has
    none]); a run whose backbones or scenes cannot be read gets a note instead of a figure."""
    figs, notes = [], []
    for label, members in list(groups.items())[:pca_runs]:
        run = members[0]
        fname = f"pca_{_safe_name(run['name'])}.png"
        try:
            pca_figure(run, os.path.join(out, fname), pca_images, pca_fit)
            figs.append((label, run["name"], fname))
        except (FileNotFoundError, ValueError) as e:
            notes.append(f"{run['name']}: no PCA map ({e})")
            log.note(f"[report] {notes[-1]}")
    return figs, notes


def intro_lines(title: str, runs: Sequence[dict], groups: dict, keys: Sequence[str],
                unfinished: Sequence[str]) -> list[str]:
    """The title, how the runs are grouped and what the tables' numbers are, and the workdirs left out."""
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
    return md


def results_table(rows: Sequence[dict]) -> list[str]:
    """'## Results': per group, mean ± std of each metric and the paired Δ patch with its interval."""
    md = ["", "## Results", "",
          "| group | runs | teacher patch recall | aligned patch recall | Δ patch | teacher image mAP | "
          "aligned image mAP | Δ image mAP | Δ patch, 95% CI | ahead |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        cells = [_ms(row[k]["mean"], row[k]["std"]) for k, _ in METRICS]
        d = row["paired_delta_patch"]
        md.append(f"| {row['group']} | {row['n']} | " + " | ".join(cells)
                  + f" | {_ci(d)} | {d['ahead']} of {d['n']} |")
    return md


def _p(c: Optional[dict]) -> str:
    return "—" if c is None or c["p"] is None else f"{c['p']:.3g}"


def paired_table(groups: dict, comparisons: dict) -> list[str]:
    """'### Paired against <first group>': every other group against the first on the seeds they share (nothing
    when no group shares two seeds with it)."""
    if not comparisons:
        return []
    base = next(iter(groups))
    md = ["", f"### Paired against `{base}`", "",
          f"Per seed, Δ patch of the group minus Δ patch of `{base}` (runs of one seed share their teacher): "
          "the mean with its 95% t-interval, the seeds where the group is ahead, and the two-sided paired "
          "t-test's p-value; beside it the same for the image mAP (with shared teachers: the aligned "
          "students' image mAP, group minus baseline).", "",
          "| group | seeds | Δ patch − baseline's, 95% CI | ahead | p | image mAP − baseline's, 95% CI | p |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for label, c in comparisons.items():
        patch, image = c["delta_patch"], c["delta_map"]
        md.append(f"| {label} | {patch['n']} | {_ci(patch)} | {patch['ahead']} of {patch['n']} | {_p(patch)} | "
                  f"{'—' if image is None else _ci(image)} | {_p(image)} |")
    return md


def globalness_table(runs: Sequence[dict], groups: dict) -> list[str]:
    """'### Globalness': per group, the background-token image mAP of teacher and aligned student (nothing when
    no run has it)."""
    if not any(r["metrics"]["teacher_bg_map"] is not None for r in runs):
        return []
    md = ["", "### Globalness: image labels from one background token", "",
          "mAP of a linear probe on the one unlabelled patch per image farthest from every object "
          "(`lalign.probe.background_tokens`): high = that token carries the whole image (global), lower = "
          "local. Mean ± std over the runs that have it.", "",
          "| group | teacher | aligned |", "|---|---:|---:|"]
    for label, members in groups.items():
        cells = [_ms(*stats([r["metrics"][f"{who}_bg_map"] for r in members])[:2])
                 for who in ("teacher", "aligned")]
        md.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return md


def per_run_table(runs: Sequence[dict], label_of: dict) -> list[str]:
    """'### Per run': each run's numbers (± over its probe seeds) and its MaskEmbed validation loss."""
    md = ["", "### Per run", "",
          "| run | group | seed | teacher patch recall | aligned patch recall | Δ patch | teacher mAP | aligned mAP "
          "| MaskEmbed best val loss |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        m = r["metrics"]
        loss = m["maskembed_val_loss"]
        md.append(f"| {r['name']} | {label_of[id(r)]} | {r['config'].get('seed', '—')} | "
                  f"{_ms(m['teacher_patch'], m['teacher_patch_probe_std'])} | "
                  f"{_ms(m['aligned_patch'], m['aligned_patch_probe_std'])} | {m['delta_patch']:+.2f} | "
                  f"{_ms(m['teacher_map'], None)} | {_ms(m['aligned_map'], None)} | "
                  f"{'—' if loss is None else f'{loss:.4f}'} |")
    return md + ["", "(± in the per-run table: std over that run's probe seeds.)"]


def probe_convergence_note(runs: Sequence[dict]) -> list[str]:
    """A warning naming the runs whose probes peaked at their last epoch (nothing when none did)."""
    at_last = []
    for r in runs:
        who = [name for name, idx in r["metrics"]["probes_best_at_last_epoch"].items() if idx]
        if who:
            at_last.append(f"`{r['name']}` ({', '.join(who)})")
    if not at_last:
        return []
    return ["", "**Probe convergence:** the best validation epoch was the last epoch in " + ", ".join(at_last)
            + ". Those probes may still have been learning; a Δ between them can reflect how fast each "
              "backbone's features are fitted rather than what they hold. Rerun with more `probe.epochs`."]


def plots_section(figures: dict) -> list[str]:
    """'## Plots': the bar plots `write_plots` wrote, with how to read them."""
    md = ["", "## Plots", "",
          "Bars: mean over the runs of a group; error bars: sample std; dots: single runs. The y axis is zoomed "
          "to the data (it does not start at 0).", "", f"![patch macro recall]({figures['patch']})", ""]
    if "map" in figures:
        md += [f"![image mAP]({figures['map']})", ""]
    return md + ["Paired differences (aligned − teacher, within each run; the teacher's seed-to-seed spread cancels):",
                 "", f"![aligned minus teacher]({figures['delta']})", ""]


def pca_section(pca_figs: Sequence[tuple[str, str, str]], pca_notes: Sequence[str], pca_fit: int) -> list[str]:
    """'## PCA maps of patch features': the figures `write_pca_maps` wrote and the runs without one."""
    if not pca_figs and not pca_notes:
        return []
    md = ["## PCA maps of patch features", "",
          "Held-out scenes (probe_test split), their ground truth, and the first three principal components of "
          "each backbone's final patch features as RGB over the patch grid (PCA fit per backbone on the "
          f"patches of {pca_fit} held-out scenes). Local features give each object's patches one colour, "
          "distinct from the background; global features colour the whole grid alike.", ""]
    for label, name, fname in pca_figs:
        md += [f"**{name}** ({label})", "", f"![PCA {name}]({fname})", ""]
    return md + [f"- {n}" for n in pca_notes]


def write_report(workdirs: Sequence[str], out: str, group_by: Optional[Sequence[str]] = None, pca: bool = True,
                 pca_runs: int = 4, pca_images: int = 4, pca_fit: int = 64, title: str = "lalign report") -> dict:
    """report.md, report.json and the figures of the finished runs among `workdirs` into `out` (the package
    docstring says what each holds); returns what report.json holds."""
    runs, unfinished = load_runs(workdirs)
    os.makedirs(out, exist_ok=True)
    keys, groups = group_runs(runs, group_by)
    label_of = {id(r): label for label, members in groups.items() for r in members}
    rows, comparisons = summarize(groups), paired_comparisons(groups)

    figures = write_plots(groups, runs, out)
    pca_figs, pca_notes = write_pca_maps(groups, out, pca_runs, pca_images, pca_fit) if pca else ([], [])

    md = (intro_lines(title, runs, groups, keys, unfinished) + results_table(rows)
          + paired_table(groups, comparisons) + globalness_table(runs, groups) + per_run_table(runs, label_of)
          + probe_convergence_note(runs) + plots_section(figures) + pca_section(pca_figs, pca_notes, pca_fit))
    files.write_text(os.path.join(out, "report.md"), "\n".join(md).rstrip() + "\n")
    data = {"group_keys": keys, "groups": rows, "paired_against_first_group": comparisons, "unfinished": unfinished,
            "runs": [{"name": r["name"], "path": r["path"], "group": label_of[id(r)], **r["metrics"]} for r in runs],
            "figures": {**figures, "pca": [f for _, _, f in pca_figs]}}
    files.write_text(os.path.join(out, "report.json"), json.dumps(data, indent=2))
    return data
