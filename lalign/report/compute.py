"""The report's numbers: means and spreads over a group's runs, the paired Δ aligned - teacher with its 95% interval,
paired tests between settings that share teachers, and the PCA projection of patch features."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from lalign.report.runs import METRICS
from lalign.stats import t_interval



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
    from scipy import stats as st  # heavy (seconds to import): only the paired tests need it

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
    """{label: {'delta_patch': paired_test, 'delta_map': paired_test}} of every other group against the first, for
    the groups sharing at least two seeds with it. With shared teachers the difference of the Δ image mAP is the
    difference of the aligned students' image mAP (how much image-level knowledge one setting keeps over the
    other); it is None where a group has no image probe."""
    labels = list(groups)
    if len(labels) < 2:
        return {}
    base = groups[labels[0]]
    out = {label: {key: paired_test(groups[label], base, key) for key in ("delta_patch", "delta_map")}
           for label in labels[1:]}
    return {label: c for label, c in out.items() if c["delta_patch"] is not None}


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
