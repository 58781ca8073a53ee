"""The patch probe's numbers: per-class counts and their macro / micro aggregates, a summary over probe seeds,
per-class tables, and the check that a probe had converged."""
from __future__ import annotations

from typing import Optional

import numpy as np


def patch_counts(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """Per-class confusion counts {'tp', 'fp', 'fn'} (float64, (C,)) of probs/labels (..., C); they add up over
    batches, so a large split can be evaluated in pieces (`metrics_from_counts(sum of counts)`)."""
    pred = probs.reshape(-1, probs.shape[-1]) > threshold
    true = labels.reshape(-1, labels.shape[-1]) > 0.5
    return {"tp": (pred & true).sum(0).astype(np.float64), "fp": (pred & ~true).sum(0).astype(np.float64),
            "fn": (~pred & true).sum(0).astype(np.float64), "patches": float(len(pred))}


def add_counts(a: Optional[dict], b: dict) -> dict:
    return dict(b) if a is None else {k: a[k] + b[k] for k in b}


def metrics_from_counts(counts: dict) -> dict:
    """Macro recall over classes with positives, micro recall, macro precision over classes with predictions,
    mean IoU over classes with positives (per class TP / (TP + FP + FN)), the fractions of (patch, class) pairs
    predicted positive and labeled positive, and the per-class values (None where undefined) with each class's
    number of positives ('per_class_support')."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    cells = counts.get("patches", 0.0) * len(tp)
    present = (tp + fn) > 0
    predicted = (tp + fp) > 0
    with np.errstate(invalid="ignore"):
        recall = np.where(present, tp / np.maximum(tp + fn, 1), np.nan)
        precision = np.where(predicted, tp / np.maximum(tp + fp, 1), np.nan)
        iou = np.where(present, tp / np.maximum(tp + fp + fn, 1), np.nan)

    def listed(v):
        return [None if np.isnan(x) else float(x) for x in v]

    return {
        "macro_recall": float(np.nanmean(recall)) if present.any() else float("nan"),
        "micro_recall": float(tp.sum() / max(tp.sum() + fn.sum(), 1)),
        "macro_precision": float(np.nanmean(precision)) if predicted.any() else 0.0,
        "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "predicted_positive_rate": float((tp + fp).sum() / cells) if cells else float("nan"),
        "positive_rate": float((tp + fn).sum() / cells) if cells else float("nan"),
        "per_class_recall": listed(recall),
        "per_class_precision": listed(precision),
        "per_class_iou": listed(iou),
        "per_class_support": [int(x) for x in tp + fn],
    }


def patch_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """probs, labels: (..., C). Macro recall over classes with positives, micro recall, macro precision over
    classes with predictions, and mean IoU (per class TP / (TP + FP + FN)); see `metrics_from_counts`."""
    return metrics_from_counts(patch_counts(probs, labels, threshold))


# How the epoch is chosen on the validation split (`probe.select_by`): the validation metric maximized (the first
# epoch that reaches the maximum). Macro recall at 0.5 is the paper's reported metric, but as a selection score a
# degenerate probe wins it: one that predicts every class on every patch has recall 1. On CamVid a 10-epoch probe
# selected by recall kept epoch 1, where it predicted every class everywhere (precision 0.27, mIoU 0.14). mIoU
# counts false positives and false negatives alike (per class TP / (TP + FP + FN)): predicting everything scores
# the classes' base rates, predicting nothing 0. Macro F1 would rank the same way (per class F1 = 2 IoU / (1 +
# IoU)); mIoU is already reported beside recall. The reported metric stays macro recall at the chosen epoch.
SELECT_BY = {"miou": "miou", "recall": "macro_recall"}
DEFAULT_SELECT_BY = "miou"
# A probe whose chosen epoch predicts more than this fraction of all (patch, class) pairs positive, and more than
# twice as many as are labeled positive, predicts most classes on most patches: its recall says little (warned in
# the log and in the results). The second condition spares data whose patches do hold most classes (label_rule
# 'global_union', a few classes each in every patch).
DEGENERATE_RATE = 0.5


def is_degenerate(run: dict) -> bool:
    """Whether a run's reported (test) metrics come from a probe that predicts most classes on most patches."""
    rate = run.get("predicted_positive_rate", 0.0)
    return rate > DEGENERATE_RATE and rate > 2 * run.get("positive_rate", 0.0)


def selection_metric(select_by: str) -> str:
    """The metric key (of `metrics_from_counts`) that `probe.select_by` maximizes on the validation split."""
    if select_by not in SELECT_BY:
        raise ValueError(f"probe.select_by={select_by!r}; choose from {sorted(SELECT_BY)} ('miou': validation mIoU, "
                         f"'recall': the paper's validation macro recall).")
    return SELECT_BY[select_by]


def improves(value: float, best: Optional[float]) -> bool:
    """Whether an epoch's validation score beats the best so far (ties keep the earlier epoch)."""
    return best is None or value > best


def select_epoch(history: list[dict], select_by: str = DEFAULT_SELECT_BY) -> int:
    """The epoch (1-based) that `select_by` chooses from epoch records holding 'val_<metric>' (the rule
    `train_patch_probe_seeds` applies as it trains)."""
    key, best, epoch = f"val_{selection_metric(select_by)}", None, None
    for h in history:
        if improves(h[key], best):
            best, epoch = h[key], h["epoch"]
    return epoch


def summarize_runs(runs: list[dict]) -> dict:
    """Mean (and std of macro recall) over probe seeds, as `evaluate_backbone` reports them, with the runs whose
    chosen epoch predicts most classes on most patches ('degenerate_runs')."""
    recalls = [r["macro_recall"] for r in runs]
    return {"macro_recall": float(np.mean(recalls)), "macro_recall_std": float(np.std(recalls)),
            "macro_recall_per_seed": recalls,
            **{k: float(np.mean([r[k] for r in runs])) for k in ("micro_recall", "macro_precision", "miou")},
            "predicted_positive_rate": float(np.mean([r.get("predicted_positive_rate", np.nan) for r in runs])),
            "selected_by": runs[0].get("selected_by"),
            "degenerate_runs": [i for i, r in enumerate(runs) if is_degenerate(r)],
            "runs": runs}


def degenerate_warning(patch: dict, backbone: str) -> Optional[str]:
    """A sentence for the log and the results when some probe run's chosen epoch predicts more than
    `DEGENERATE_RATE` of all (patch, class) pairs positive on the test split, and twice as many as are labeled
    positive (`is_degenerate`), else None."""
    bad = [i for i, r in enumerate(patch.get("runs", ())) if is_degenerate(r)]
    if not bad:
        return None
    rates = [round(patch["runs"][i]["predicted_positive_rate"], 2) for i in bad]
    return (f"WARNING: {backbone}: at the chosen epoch probe run(s) {bad} of {len(patch['runs'])} predict "
            f"{rates} of all (patch, class) pairs positive: most classes on most patches, so their recall says "
            f"little (macro precision {patch.get('macro_precision', float('nan')):.2f}, mIoU "
            f"{patch.get('miou', float('nan')):.2f}). " + _degenerate_advice(patch, bad))


def _degenerate_advice(patch: dict, bad: list[int]) -> str:
    """What to do about degenerate runs `bad`: select by mIoU where that chooses another epoch (read from the
    runs' histories), else train longer."""
    runs = patch["runs"]
    if (patch.get("selected_by") or "recall") != "recall":
        return "No epoch did better by validation mIoU: the probe had not learned; raise probe.epochs."
    alts = [select_epoch(runs[i]["history"], "miou") if "val_miou" in (runs[i].get("history") or [{}])[0]
            else None for i in bad]
    if any(a is not None and a != runs[i]["best_epoch"] for a, i in zip(alts, bad)):
        return (f"The epochs were chosen by validation recall, which such a probe wins; validation mIoU "
                f"(probe.select_by='miou') chooses epoch(s) {alts}.")
    if all(a is not None for a in alts):
        return "Validation mIoU chooses the same epoch(s): the probe had not learned; raise probe.epochs."
    return "The epochs were chosen by validation recall, which such a probe wins: probe.select_by='miou' does not."


def probes_best_at_last_epoch(patch: dict) -> list[int]:
    """Indices (in `cfg.seeds` order) of the probe runs whose best validation epoch was their last one.

    Such a probe may still have been learning, and a comparison between two backbones can then measure how fast
    each is fitted rather than what its features hold: the demo's 30-epoch probe gave MaskEmbed +2 points on 30
    classes that shrank to +0.7 at convergence (docs/results.md, "Probe convergence"). Reads the saved history, so it
    works on results written before this check existed."""
    return [i for i, r in enumerate(patch.get("runs", ())) if r["best_epoch"] == len(r["history"])]


def convergence_warning(patch: dict, backbone: str) -> Optional[str]:
    """A sentence for the log when some probe run peaked at its last epoch, else None."""
    last = probes_best_at_last_epoch(patch)
    if not last:
        return None
    epochs = len(patch["runs"][last[0]]["history"])
    return (f"WARNING: {backbone}: the best validation epoch was the last one ({epochs}) for probe run(s) {last} "
            f"of {len(patch['runs'])}; the probe may not have converged. Raise probe.epochs before comparing "
            f"backbones.")


def per_class_rows(runs: list[dict], class_names: list) -> list[dict]:
    """Per-class test metrics averaged over probe seeds (None where undefined in every seed)."""
    rows = []
    for k, name in enumerate(class_names):
        row = {"id": k, "name": name, "test_positives": runs[0]["per_class_support"][k]}
        for metric in ("recall", "precision", "iou"):
            vals = [r[f"per_class_{metric}"][k] for r in runs if r[f"per_class_{metric}"][k] is not None]
            row[metric] = float(np.mean(vals)) if vals else None
        rows.append(row)
    return rows


def per_class_table(results: dict) -> str:
    p = results["patch"]
    fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        f"# Patch probe: {results['backbone']['path']}",
        "",
        f"Data: {results['data']['name']}, label rule '{results['data']['label_rule']}', "
        f"{results['data']['num_classes']} classes; splits "
        + ", ".join(f"{k} {v['count']}" for k, v in results["data"]["splits"].items()) + ".",
        f"Test split at the best validation epoch by {p.get('selected_by') or 'recall'} "
        f"(epochs {[r['best_epoch'] for r in p['runs']]}), "
        f"{len(p['runs'])} probe seed(s):",
        "",
        f"- macro recall @0.5 (classes with positives): **{p['macro_recall']:.4f}** ± {p['macro_recall_std']:.4f}",
        f"- micro recall {p['micro_recall']:.4f}, macro precision {p['macro_precision']:.4f}, "
        f"mIoU {p['miou']:.4f}",
    ]
    for warning in (convergence_warning(p, "this backbone"), degenerate_warning(p, "this backbone")):
        if warning:
            lines.append(f"- **{warning}**")
    if "image" in results:
        lines.append(f"- image-level linear probe mAP {results['image']['map']:.4f}; from one background token "
                     f"(globalness) {results['image'].get('background_token_map', float('nan')):.4f}")
    lines += ["", "| id | class | test patches | recall | precision | IoU |", "|---:|---|---:|---:|---:|---:|"]
    for r in results["per_class"]:
        lines.append(f"| {r['id']} | {r['name']} | {r['test_positives']} | {fmt(r['recall'])} | "
                     f"{fmt(r['precision'])} | {fmt(r['iou'])} |")
    return "\n".join(lines) + "\n"
