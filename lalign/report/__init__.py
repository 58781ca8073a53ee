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

    runs.py     loading finished runs (read only) and grouping them
    compute.py  the numbers: means over runs, paired deltas with intervals, paired tests, PCA
    render.py   the files: plots, PCA maps, report.md, report.json
    command.py  the command line (`main`)
"""
from lalign.report.compute import (paired_comparisons, paired_delta, paired_test, pca_rgb, stats,
                                   summarize)
from lalign.report.runs import differing_keys, flatten, group_runs, load_backbones, load_run
from lalign.report.render import bar_plot, delta_plot, pca_figure, write_report
from lalign.report.command import main
from lalign.stats import t_interval


__all__ = ["bar_plot", "delta_plot", "differing_keys", "flatten", "group_runs", "load_backbones", "load_run",
           "main", "paired_comparisons", "paired_delta", "paired_test", "pca_figure", "pca_rgb", "stats",
           "summarize", "t_interval", "write_report"]
