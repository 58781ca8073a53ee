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
            "fn": (~pred & true).sum(0).astype(np.float64)}


def add_counts(a: Optional[dict], b: dict) -> dict:
    return dict(b) if a is None else {k: a[k] + b[k] for k in b}


def metrics_from_counts(counts: dict) -> dict:
    """Macro recall over classes with positives, micro recall, macro precision over classes with predictions,
    mean IoU over classes with positives (per class TP / (TP + FP + FN)), and the per-class values (None where
    undefined) with each class's number of positives ('per_class_support')."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
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
        "per_class_recall": listed(recall),
        "per_class_precision": listed(precision),
        "per_class_iou": listed(iou),
        "per_class_support": [int(x) for x in tp + fn],
    }


def patch_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """probs, labels: (..., C). Macro recall over classes with positives, micro recall, macro precision over
    classes with predictions, and mean IoU (per class TP / (TP + FP + FN)); see `metrics_from_counts`."""
    return metrics_from_counts(patch_counts(probs, labels, threshold))


def summarize_runs(runs: list[dict]) -> dict:
    """Mean (and std of macro recall) over probe seeds, as `evaluate_backbone` reports them."""
    recalls = [r["macro_recall"] for r in runs]
    return {"macro_recall": float(np.mean(recalls)), "macro_recall_std": float(np.std(recalls)),
            "macro_recall_per_seed": recalls,
            **{k: float(np.mean([r[k] for r in runs])) for k in ("micro_recall", "macro_precision", "miou")},
            "runs": runs}


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
        f"Test split at the best validation epoch (epochs {[r['best_epoch'] for r in p['runs']]}), "
        f"{len(p['runs'])} probe seed(s):",
        "",
        f"- macro recall @0.5 (classes with positives): **{p['macro_recall']:.4f}** ± {p['macro_recall_std']:.4f}",
        f"- micro recall {p['micro_recall']:.4f}, macro precision {p['macro_precision']:.4f}, "
        f"mIoU {p['miou']:.4f}",
    ]
    warning = convergence_warning(p, "this backbone")
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
