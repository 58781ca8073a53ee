"""How locality is measured: a patch-level probe on frozen features, and a linear image-level probe.

Patch probe (docs/design.md): frozen backbone, final features of every patch; probe = 2 transformer blocks at the
backbone's width with LayerScale 0.01, LayerNorm, Dense -> classes; per-patch multi-label BCE; AdamW with warmup
and cosine decay to lr/10. Metric: macro-averaged recall at sigmoid > 0.5 over classes present in the evaluated
set. The epoch is chosen on a validation split and the *test* split is reported at that epoch, so nothing is
tuned on the test scenes.

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
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lalign import files
from lalign.log import info
from lalign.checkpoints.load import guess_format, load_any
from lalign.models.decoder import PatchProbe


def extract_features(features_fn: Callable, images: np.ndarray, num_prefix_tokens: int,
                     batch_size: int = 256) -> np.ndarray:
    """Patch tokens (N, num_patches, D) of a frozen backbone, prefix tokens dropped."""
    fn = jax.jit(features_fn)
    out = [np.asarray(fn(jnp.asarray(images[i:i + batch_size]))[:, num_prefix_tokens:], np.float32)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------------- metrics
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


# ------------------------------------------------------------------------------------------------ the probes
def train_patch_probe(train, val, test, cfg, seed: int, num_heads: int,
                      log: Optional[Callable[[dict], None]] = None) -> dict:
    """train/val/test: (features (N, P, D), labels (N, P, C)). Returns the test metrics at the best val epoch.

    Features may be float16 and labels uint8 (cast to float32 on the device), and numpy memmaps (a split larger
    than memory); evaluation streams over the split. `log`, if given, receives each epoch's history record."""
    x_train, y_train = train
    num_classes = y_train.shape[-1]
    model = PatchProbe(num_classes=num_classes, num_heads=num_heads, depth=cfg.depth)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup_steps, total - 1), total,
                                                  cfg.lr * cfg.lr_min_ratio)
    tx = optax.adamw(schedule, weight_decay=cfg.wd)
    key = jax.random.key(seed)
    params = model.init(key, jnp.asarray(x_train[:1], jnp.float32))["params"]
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
        x, y = x.astype(jnp.float32), y.astype(jnp.float32)

        def loss_fn(p):
            return optax.sigmoid_binary_cross_entropy(model.apply({"params": p}, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, x):
        return jax.nn.sigmoid(model.apply({"params": params}, x.astype(jnp.float32)))

    def evaluate(params, split):
        x, y = split
        counts = None
        for i in range(0, len(x), 512):
            counts = add_counts(counts, patch_counts(np.asarray(predict(params, jnp.asarray(x[i:i + 512]))),
                                                     np.asarray(y[i:i + 512])))
        return metrics_from_counts(counts)

    rng = np.random.default_rng(seed)
    history, best = [], None
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(x_train))
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            params, opt_state, loss = step(params, opt_state, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
        v, t = evaluate(params, val), evaluate(params, test)
        history.append({"epoch": epoch + 1, "loss": float(loss), "val_macro_recall": v["macro_recall"],
                        "test_macro_recall": t["macro_recall"]})
        if log is not None:
            log(history[-1])
        if best is None or v["macro_recall"] > best[0]["macro_recall"]:
            best = (v, t, epoch + 1)
    val_m, test_m, best_epoch = best
    return {**test_m, "val_macro_recall": val_m["macro_recall"], "best_epoch": best_epoch, "history": history}


def image_linear_probe(train, test, c: float = 1.0) -> dict:
    """Logistic regression (one per class) on mean-pooled features -> macro AP on the test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.preprocessing import StandardScaler

    (x_train, y_train), (x_test, y_test) = train, test
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    scores = np.zeros_like(y_test, dtype=np.float64)
    for k in range(y_train.shape[1]):
        if y_train[:, k].min() == y_train[:, k].max():
            continue
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train[:, k])
        scores[:, k] = clf.decision_function(x_test)
    keep = y_test.sum(0) > 0
    return {"map": float(average_precision_score(y_test[:, keep], scores[:, keep], average="macro"))}


def background_tokens(feats: np.ndarray, patch_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features of one background patch per image (K, D), indices of those K images) for a "globalness" probe.

    The patch chosen is the unlabelled one farthest (Euclidean distance on the patch grid; ties: first in raster
    order) from every labelled patch, so its receptive field holds no object if features are local. Images
    without an unlabelled patch, or without any object, are left out."""
    n, num_patches, _ = feats.shape
    side = int(round(np.sqrt(num_patches)))
    if side * side != num_patches:
        raise ValueError(f"background_tokens needs a square patch grid, got {num_patches} patches.")
    rows, cols = np.divmod(np.arange(num_patches), side)
    dist = np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])  # (P, P)
    labelled = patch_labels.reshape(n, num_patches, -1).max(-1) > 0.5  # (N, P)
    keep = labelled.any(1) & ~labelled.all(1)
    far = np.where(labelled[:, None, :], dist[None], np.inf).min(-1)  # distance of each patch to an object
    far = np.where(labelled, -1.0, far)
    idx = np.flatnonzero(keep)
    return feats[idx, far[idx].argmax(1)], idx


def background_token_probe(train, test) -> float:
    """Globalness: image-label mAP of a linear probe on one background token per image (`background_tokens`);
    `train`, `test` = (patch features (N, P, D), patch labels (N, P, C), image labels (N, C)). Near the pooled
    features' mAP: every token carries the whole image's content; low: the tokens are local."""
    data = []
    for feats, patch_labels, labels in (train, test):
        x, idx = background_tokens(feats, patch_labels)
        data.append((x, np.asarray(labels)[idx]))
    return image_linear_probe(*data)["map"]


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


def evaluate_backbone(features_fn: Callable, num_prefix_tokens: int, num_heads: int, splits: dict, cfg) -> dict:
    """Patch probe (over `cfg.seeds`) and image probe for one frozen backbone on the probe splits."""
    feats = {name: extract_features(features_fn, s["image"], num_prefix_tokens) for name, s in splits.items()}
    patch = {name: (feats[name], splits[name]["patch_labels"]) for name in splits}
    runs = [train_patch_probe(patch["probe_train"], patch["probe_val"], patch["probe_test"], cfg, seed, num_heads)
            for seed in cfg.seeds]
    pooled = {name: (feats[name].mean(1), splits[name]["labels"]) for name in splits}
    image = image_linear_probe(pooled["probe_train"], pooled["probe_test"])
    image["background_token_map"] = background_token_probe(
        *[(feats[n], splits[n]["patch_labels"], splits[n]["labels"]) for n in ("probe_train", "probe_test")])
    return {"patch": summarize_runs(runs), "image": image}


# ------------------------------------------------------------------------------------- the command-line probe
def resolve_backbone(path: str) -> str:
    """A pipeline workdir means its aligned student: the newest step under WORKDIR/checkpoints/best/."""
    best = os.path.join(path, "checkpoints", "best")
    if os.path.isdir(best):
        steps = sorted((int(s) for s in os.listdir(best) if s.isdigit()), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{best} holds no checkpoint step directory.")
        return os.path.join(best, str(steps[0]))
    return path


def load_backbone(path: str, fmt: str = "", fields: Optional[dict] = None):
    """(ViT, params, resolved path, format) of a frozen backbone in any format `checkpoints.load.load_any` reads."""

    if not path:
        raise ValueError("config.backbone must name the backbone checkpoint (orbax dir, training checkpoint step "
                         "dir or pipeline workdir, big_vision .npz, HF dir, timm .safetensors).")
    path = resolve_backbone(path)
    fmt = fmt or guess_format(path)
    fields = {k: v for k, v in (fields or {}).items() if v is not None and v != ""}
    model, params = load_any(path, fmt, fields)
    return model, params, path, fmt


def backbone_image_size(model, params, image_size: int = 0) -> int:
    """`image_size` if given, else the size a learned position embedding was trained at (grid * patch)."""
    if image_size:
        return int(image_size)
    pos = params.get("pos_embedding")
    if pos is None:
        raise ValueError("This backbone has no learned position embedding to tell its image size: set "
                         "config.data.image_size.")
    rows = int(np.shape(pos)[1]) - int(model.has_class_token and model.cls_posemb)
    grid = math.isqrt(rows)
    if grid * grid != rows:
        raise ValueError(f"pos_embedding has {rows} patch rows, not a square grid: set config.data.image_size.")
    return grid * int(model.patch_size[0])


def make_features_fn(model, params, dtype: str = "") -> Callable[[np.ndarray], jax.Array]:
    """images (B, S, S, 3) -> patch tokens (B, N, D) float32 after the final norm, prefix tokens dropped. One
    jitted function; the params are an argument (not constants baked into the program)."""
    backbone = model.clone(pool_type="none", num_classes=None, class_token=model.has_class_token,
                           dtype=jnp.dtype(dtype) if dtype else None)
    params = jax.device_put({k: v for k, v in params.items() if k not in ("MAPHead_0", "head")})
    n_prefix = model.num_prefix_tokens

    @jax.jit
    def fn(p, images):
        return backbone.apply({"params": p}, images)[1]["encoded"][:, n_prefix:].astype(jnp.float32)

    return lambda images: fn(params, images)


@dataclasses.dataclass
class ProbeSplit:
    """One probe split: at most `size` examples, produced as batches {'image', 'patch_labels', 'labels'}."""

    name: str
    source: str
    size: int
    batches: Callable[[int], Iterator[dict]]
    num_classes: int
    dataset: object = None  # a SegmentationFolder (for its skipped files)


def _array_split(name: str, source: str, arrays: dict) -> ProbeSplit:
    def batches(bs):
        for i in range(0, len(arrays["image"]), bs):
            yield {k: arrays[k][i:i + bs] for k in ("image", "patch_labels", "labels")}

    return ProbeSplit(name, source, len(arrays["image"]), batches, arrays["patch_labels"].shape[-1])


def _folder_split(name: str, dataset, indices, num_threads: int, note: str = "") -> ProbeSplit:
    indices = [int(i) for i in indices]
    return ProbeSplit(name, f"{dataset.name} ({len(indices)} of {len(dataset)}{note})", len(indices),
                      lambda bs: dataset.batches(bs, indices, num_threads), dataset.num_classes, dataset)


def probe_splits(config, image_size: int, patch_size: int, normalization: str) -> tuple[dict, list]:
    """({'train', 'val', 'test'}: ProbeSplit, class names) for `config.data`."""
    d = config.data
    if d.name == "scenes":
        from lalign import data as data_lib

        p = config.probe
        sizes = {"train": ("probe_train", p.num_train), "val": ("probe_val", p.num_val),
                 "test": ("probe_test", p.num_test)}
        seed = d.get("seed", 0)
        splits = {}
        for name, (split, n) in sizes.items():
            source = data_lib.image_source(d, split, seed=seed)
            if source.spec.image_size != image_size or source.spec.patch_size != patch_size:
                raise ValueError(f"Scenes of {source.spec.image_size}px with {source.spec.patch_size}px patches do "
                                 f"not fit this backbone ({image_size}px, {patch_size}px patches).")
            splits[name] = _array_split(name, f"scenes/{split} seed {seed} ({n})", source.examples(0, n))
        nc = splits["train"].num_classes
        names = [str(c) for c in range(10)] if nc == 10 else [f"{c % 10}/colour{c // 10}" for c in range(nc)]
        return splits, names

    from lalign.data import segmentation as seg

    kw = dict(image_size=image_size, patch_size=patch_size, normalization=normalization,
              label_rule=d.label_rule, min_pixels=d.get("min_pixels", 1))
    threads = d.get("num_threads", 8)
    if d.name == "coco_stuff":
        if not d.root:
            raise ValueError("config.data.root must name the COCO-Stuff directory (images/, stuffthingmaps/).")
        train_ds, test_ds = seg.coco_stuff(d.root, "train2017", **kw), seg.coco_stuff(d.root, "val2017", **kw)
        val_ds = None
    elif d.name == "ade20k":
        if not d.root:
            raise ValueError("config.data.root must name the ADEChallengeData2016 directory (images/, annotations/).")
        train_ds, test_ds = seg.ade20k(d.root, "training", **kw), seg.ade20k(d.root, "validation", **kw)
        val_ds = None
    elif d.name == "folder":
        def folder(split):
            images, labels = d.get(f"{split}_images"), d.get(f"{split}_labels")
            if not images:
                return None
            names = list(d.class_names) if d.get("class_names") else None
            return seg.SegmentationFolder(images, labels, num_classes=d.num_classes, ignore_index=d.ignore_index,
                                          class_names=names, name=f"folder/{split}", **kw)

        train_ds, val_ds, test_ds = folder("train"), folder("val"), folder("test")
        if train_ds is None or test_ds is None:
            raise ValueError("data.name='folder' needs data.train_images/train_labels and data.test_images/"
                             "test_labels (data.val_images/val_labels optional: else carved out of train).")
    else:
        raise ValueError(f"Unknown config.data.name {d.name!r}; choose 'coco_stuff', 'ade20k', 'folder' or "
                         f"'scenes'.")

    num_train, num_test = d.get("num_train", -1), d.get("num_test", -1)
    note = ""
    if val_ds is None:  # carve a validation split out of train; the data set's own val split is the test split
        train_idx, val_idx = seg.carve_validation(len(train_ds), d.num_val, d.get("split_seed", 0), num_train)
        val_ds, note = train_ds, f", carved out with split_seed {d.get('split_seed', 0)}"
    else:
        train_idx, val_idx = np.arange(len(train_ds)), np.arange(len(val_ds))
        if 0 <= num_train < len(train_idx):
            train_idx = np.sort(np.random.default_rng(d.get("split_seed", 0)).permutation(len(train_ds))[:num_train])
    test_idx = np.arange(len(test_ds) if num_test < 0 else min(num_test, len(test_ds)))
    splits = {"train": _folder_split("train", train_ds, train_idx, threads),
              "val": _folder_split("val", val_ds, val_idx, threads, note),
              "test": _folder_split("test", test_ds, test_idx, threads)}
    names = list(train_ds.class_names) if train_ds.class_names else [str(c) for c in range(train_ds.num_classes)]
    return splits, names


def extract_split(features_fn: Callable, split: ProbeSplit, num_patches: int, width: int, *, batch_size: int,
                  store: str = "memory", dtype: str = "float32", directory: str = "") -> dict:
    """Runs the frozen backbone over a split once, in fixed-size (padded) batches through one jitted function.
    Returns {'features' (n, P, D), 'patch_labels' (n, P, C) uint8, 'pooled' (n, D), 'labels' (n, C) uint8,
    'count', 'skipped'}; with store='disk' the first two are .npy memmaps under `directory`."""
    n, c = split.size, split.num_classes
    if store == "disk":
        os.makedirs(directory, exist_ok=True)

        def alloc(tag, shape, dt):
            return np.lib.format.open_memmap(os.path.join(directory, f"{split.name}_{tag}.npy"), mode="w+",
                                             dtype=dt, shape=shape)
    elif store == "memory":
        def alloc(tag, shape, dt):
            return np.zeros(shape, dt)
    else:
        raise ValueError(f"config.features.store must be 'memory' or 'disk', got {store!r}.")
    feats = alloc("features", (n, num_patches, width), np.dtype(dtype))
    labels = alloc("patch_labels", (n, num_patches, c), np.uint8)
    pooled, image_labels = np.zeros((n, width), np.float32), np.zeros((n, c), np.uint8)
    count, t0, last = 0, time.time(), time.time()
    already_skipped = len(getattr(split.dataset, "skipped", None) or [])  # train and val may share a dataset
    for batch in split.batches(batch_size):
        images = np.asarray(batch["image"], np.float32)
        b = len(images)
        if b < batch_size:  # pad: one compiled shape for every batch
            images = np.concatenate([images, np.zeros((batch_size - b, *images.shape[1:]), np.float32)])
        tokens = np.asarray(jax.device_get(features_fn(images)))[:b]
        if tokens.shape[1:] != (num_patches, width):
            raise ValueError(f"The backbone gave tokens of shape {tokens.shape[1:]}, expected {(num_patches, width)}.")
        feats[count:count + b] = tokens
        pooled[count:count + b] = tokens.mean(1)
        labels[count:count + b] = batch["patch_labels"]
        image_labels[count:count + b] = batch["labels"]
        count += b
        if time.time() - last > 30:
            last = time.time()
            info(f"[probe] features {split.name}: {count}/{n} images, {count / (last - t0):.0f} images/s")
    skipped = list((getattr(split.dataset, "skipped", None) or {}).items())[already_skipped:]
    if count == 0:
        raise ValueError(f"No readable example in the {split.name} split ({split.source}).")
    return {"features": feats[:count], "patch_labels": labels[:count], "pooled": pooled[:count],
            "labels": image_labels[:count], "count": count, "skipped": skipped}


def _normalization_for(model, name: str) -> str:
    if name:
        return name
    return "clip" if (model.pre_norm and model.has_class_token) else "siglip"


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


def run(config, workdir: str) -> dict:
    """The probe of one frozen backbone on `config.data`; writes `workdir/results.json` and `per_class.md`."""
    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    files.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    model, params, path, fmt = load_backbone(config.backbone, config.get("backbone_format", ""),
                                             dict(config.get("model") or {}))
    image_size = backbone_image_size(model, params, config.data.get("image_size", 0))
    patch = int(model.patch_size[0])
    normalization = _normalization_for(model, config.data.get("normalization", ""))
    info(f"[probe] backbone {path} ({fmt}): ViT width {model.width}, depth {model.depth}, patch {patch}, "
          f"{image_size}px, normalization '{normalization}'")
    splits, class_names = probe_splits(config, image_size, patch, normalization)
    grid = image_size // patch
    fcfg = config.get("features") or {}
    features_fn = make_features_fn(model, params, config.get("compute_dtype", ""))
    extracted, times = {}, {}
    for name, split in splits.items():
        t0 = time.time()
        extracted[name] = extract_split(features_fn, split, grid * grid, model.width,
                                        batch_size=fcfg.get("batch_size", 64), store=fcfg.get("store", "memory"),
                                        dtype=fcfg.get("dtype", "float32"),
                                        directory=os.path.join(workdir, "features"))
        times[f"features_{name}_s"] = time.time() - t0
        info(f"[probe] features {name}: {extracted[name]['count']} images from {split.source} "
              f"[{times[f'features_{name}_s']:.0f}s]" + (f", {len(extracted[name]['skipped'])} skipped"
                                                         if extracted[name]["skipped"] else ""))

    pcfg = config.probe
    data = {name: (e["features"], e["patch_labels"]) for name, e in extracted.items()}
    runs = []
    t0 = time.time()
    for seed in pcfg.seeds:
        def log(h, seed=seed):
            info(f"[probe] seed {seed} epoch {h['epoch']}/{pcfg.epochs} | loss {h['loss']:.4f} | val macro recall "
                  f"{h['val_macro_recall']:.4f} | test macro recall {h['test_macro_recall']:.4f}")

        runs.append(train_patch_probe(data["train"], data["val"], data["test"], pcfg, seed, model.num_heads, log))
    times["probe_s"] = time.time() - t0
    results = {
        "backbone": {"path": os.path.abspath(path), "format": fmt, "width": model.width, "depth": model.depth,
                     "patch_size": patch, "image_size": image_size, "normalization": normalization,
                     "num_prefix_tokens": model.num_prefix_tokens},
        "data": {"name": config.data.name, "label_rule": config.data.get("label_rule", "union"),
                 "num_classes": len(class_names),
                 "splits": {name: {"source": splits[name].source, "count": e["count"],
                                   "skipped": [{"file": f, "reason": r} for f, r in e["skipped"]]}
                            for name, e in extracted.items()}},
        "patch": summarize_runs(runs),
        "per_class": per_class_rows(runs, class_names),
    }
    if config.get("image_probe", False):
        t0 = time.time()
        results["image"] = image_linear_probe((extracted["train"]["pooled"], extracted["train"]["labels"]),
                                              (extracted["test"]["pooled"], extracted["test"]["labels"]))
        results["image"]["background_token_map"] = background_token_probe(
            *[(extracted[n]["features"], extracted[n]["patch_labels"], extracted[n]["labels"])
              for n in ("train", "test")])
        times["image_probe_s"] = time.time() - t0
    times["total_s"] = time.time() - t_start
    results["runtime_s"] = times
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


def main(argv) -> None:
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    # Flags are defined only when run as a program, so importing lalign.probe (as lalign.pipeline does, next to
    # lalign.main's own --config) defines none.
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Probe config file, e.g. configs/probe/coco_stuff.py[:smoke].",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where results.json, per_class.md (and features/ if stored on disk) go.")
    flags.mark_flags_as_required(["config", "workdir"])
    from lalign import allocator

    allocator.use_tcmalloc()  # feature extraction and probe training run on the CPU too: lalign/allocator.py
    from lalign import cli

    cli.run_absl("probe", main)
