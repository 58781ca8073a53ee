"""`python -m lalign.probe`: the probe of one frozen backbone on `config.data`, written as `results.json` and
`per_class.md` (the package docstring has the commands)."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from lalign import config as config_lib
from lalign import files
from lalign.data.probe_splits import data_options, probe_splits
from lalign.log import info
from lalign.probe.evaluate import evaluate_backbone
from lalign.probe.features import (backbone_image_size, fit_to_image_size, load_backbone, make_features_fn,
                                   normalization_for)
from lalign.probe.metrics import convergence_warning, per_class_rows, per_class_table


def run(config, workdir: str) -> dict:
    """The probe of one frozen backbone on `config.data`; writes `workdir/results.json` and `per_class.md`. Fields
    the config leaves out take their defaults (lalign/config.py, PROBE_SCHEMA); a bad one is an error here."""
    t_start = time.time()
    config_lib.complete(config, config_lib.PROBE_SCHEMA)
    errors = config_lib.errors(config, config_lib.PROBE_SCHEMA)
    if errors:
        raise ValueError("Invalid probe config (nothing was written): " + "; ".join(errors) + ".")
    os.makedirs(workdir, exist_ok=True)
    files.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    model, params, path, fmt = load_backbone(config.backbone, config.backbone_format, dict(config.model))
    data = data_options(config.data)  # config.data over its data set's defaults
    image_size = backbone_image_size(model, params, data.image_size)
    patch = int(model.patch_size[0])
    # Another image size than the checkpoint's: its position table resized as training resizes a teacher's.
    posemb_resize = config.posemb_resize
    params, resized_from = fit_to_image_size(model, params, image_size, posemb_resize)
    normalization = normalization_for(model, data.normalization, path, fmt)
    size_note = ("config.data.image_size" if data.image_size
                 else "the checkpoint's own: its position grid x patch; config.data.image_size sets another")
    info(f"[probe] backbone {path} ({fmt}): ViT width {model.width}, depth {model.depth}, patch {patch}, "
         f"{image_size}px ({size_note}), normalization '{normalization}'")
    splits, class_names = probe_splits(config, image_size, patch, normalization)
    grid = image_size // patch
    features_fn = make_features_fn(model, params, config.compute_dtype)
    res = evaluate_backbone(features_fn, splits, grid * grid, model.width, model.num_heads, config.probe,
                            image_probe=config.image_probe, features_cfg=config.features,
                            directory=workdir)
    extracted, runs = res["extracted"], res["patch"]["runs"]
    results = {
        "backbone": {"path": os.path.abspath(path), "format": fmt, "width": model.width, "depth": model.depth,
                     "patch_size": patch, "image_size": image_size, "normalization": normalization,
                     "num_prefix_tokens": model.num_prefix_tokens,
                     "posemb_resized_from": None if resized_from is None else list(resized_from),
                     "posemb_resize": posemb_resize},
        "data": {"name": config.data.name, "label_rule": data.label_rule,
                 "num_classes": len(class_names),
                 "splits": {name: {"source": splits[name].source, "count": e["count"],
                                   "skipped": [{"file": f, "reason": r} for f, r in e["skipped"]]}
                            for name, e in extracted.items()}},
        "patch": res["patch"],
        "per_class": per_class_rows(runs, class_names),
    }
    if "image" in res:
        results["image"] = res["image"]
    results["runtime_s"] = dict(res["runtime_s"], total_s=time.time() - t_start)
    files.write_text(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
    files.write_text(os.path.join(workdir, "per_class.md"), per_class_table(results))
    p = results["patch"]
    warning = convergence_warning(p, results["backbone"]["path"])
    if warning:
        info(f"[probe] {warning}")
    info(f"[probe] test macro recall {p['macro_recall']:.4f} ± {p['macro_recall_std']:.4f} "
         f"(seeds {np.round(p['macro_recall_per_seed'], 4).tolist()}), micro recall {p['micro_recall']:.4f}, "
         f"macro precision {p['macro_precision']:.4f}, mIoU {p['miou']:.4f}"
         + (f", image mAP {results['image']['map']:.4f}" if "image" in results else "")
         + f"  -> {os.path.join(workdir, 'results.json')}")
    return results
