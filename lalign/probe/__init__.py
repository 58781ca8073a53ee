"""How locality is measured: a patch-level probe on frozen features, and a linear image-level probe.

    metrics.py   per-class counts, macro / micro aggregates, summaries over seeds, per-class tables
    heads.py     the probes: patch (locality), linear image (global knowledge), background token (globalness)
    features.py  the frozen backbone: loading, image size, features of a split (memory or memmaps)
    evaluate.py  one backbone, evaluated (the pipeline's probe stage and the CLI share it)
    run.py       the CLI: one backbone on `config.data`, results.json + per_class.md
The splits of each data set are built in lalign/data/probe_splits.py.

Patch probe (docs/design.md): frozen backbone, final features of every patch; probe = 2 transformer blocks at the
backbone's width with LayerScale 0.01, LayerNorm, Dense -> classes; per-patch multi-label BCE; AdamW with warmup
and cosine decay to lr/10. Metric: macro-averaged recall at sigmoid > 0.5 over classes present in the evaluated
set. The epoch is chosen on a validation split (by validation mIoU, `probe.select_by`: recall is won by a probe
predicting every class everywhere) and the *test* split is reported at that epoch, so nothing is tuned on the
test scenes.

Image probe: logistic regression on mean-pooled patch features (does global knowledge survive alignment?),
reported as macro average precision (mAP) over classes.

Command line (any backbone `lalign.checkpoints.load.load_any` reads: a lalign orbax params dir, a MaskEmbed training
checkpoint step dir or a pipeline workdir (its aligned student, best checkpoint), a big_vision npz, a Hugging Face
directory, a timm .safetensors):

    python -m lalign.probe --config=configs/probe/coco_stuff.py --config.backbone=PATH \\
        --config.data.root=COCO_STUFF_ROOT --workdir=DIR [--config.backbone_format=bigvision]
    python -m lalign.probe --config=configs/probe/scenes.py:RUN --config.backbone=RUN/teacher/params --workdir=DIR

writes `DIR/results.json` (all metrics, per seed and per class) and `DIR/per_class.md` (a readable table).
COCO-Stuff has only train2017/val2017: a seeded random `data.num_val` images of train2017 are the validation split
(epoch selection) and val2017 is the reported test split.
"""
from lalign.data.probe_splits import ProbeSplit, array_split, probe_splits
from lalign.probe.evaluate import evaluate_backbone, extract_splits, image_probes, train_patch_probes
from lalign.probe.features import (backbone_image_size, extract_split, fit_to_image_size, load_backbone,
                                   make_features_fn, normalization_for, resolve_backbone)
from lalign.probe.heads import (background_token_probe, background_tokens, image_linear_probe,
                                train_patch_probe, train_patch_probe_seeds)
from lalign.probe.metrics import (SELECT_BY, add_counts, convergence_warning, degenerate_warning,
                                  metrics_from_counts, patch_counts, patch_metrics, per_class_rows, per_class_table,
                                  probes_best_at_last_epoch, select_epoch, summarize_runs)
from lalign.probe.run import run

__all__ = [
    "ProbeSplit",
    "array_split",
    "probe_splits",
    "evaluate_backbone",
    "extract_splits",
    "image_probes",
    "train_patch_probes",
    "backbone_image_size",
    "extract_split",
    "fit_to_image_size",
    "load_backbone",
    "make_features_fn",
    "normalization_for",
    "resolve_backbone",
    "background_token_probe",
    "background_tokens",
    "image_linear_probe",
    "train_patch_probe",
    "train_patch_probe_seeds",
    "SELECT_BY",
    "add_counts",
    "convergence_warning",
    "degenerate_warning",
    "metrics_from_counts",
    "patch_counts",
    "patch_metrics",
    "per_class_rows",
    "per_class_table",
    "probes_best_at_last_epoch",
    "select_epoch",
    "summarize_runs",
    "run",
]
