"""A locality meter while MaskEmbed trains: at each validation, a cheap patch probe of the student and of its
teacher on a small fixed labelled set (`config.watch`), logged beside val_loss.

The validation loss says how well the decoder predicts the teacher, not whether the student's patch tokens kept
what made the teacher useful: with a learning rate too large for its batch, a run's val loss fell 1.99 -> 0.45
while its patch probe fell from the teacher's 0.49 to 0.22, and nothing showed it until a separate probe ran.

- The watch set: the first `num_images` examples of `watch.source` ('scenes': the embedded scenes' `probe_val`
  split with their patch labels; 'folder': `images` + `labels` PNGs, any layout `lalign.data.segmentation` reads;
  'coco_stuff' / 'ade20k': their validation split under `root`), at the run's image size, patch size and
  normalization; a folder's examples are a fixed random subset. "" (or an empty path): no labels.
- Features: patch tokens after the final norm, prefix tokens dropped, as the patch probe reads them: the
  teacher's once, at the start; the student's at each validation.
- The probe: ridge regression, in closed form, from a token (and a bias) to its patch's multi-hot labels, fitted
  on the first `fit_fraction` of the set and read on the rest, each class at the midpoint between its fitted
  patches' mean score and the other patches' (equal priors: read at 0.5, a class on 3% of the patches is almost
  never predicted, and the demo teacher's recall was 0.09); macro recall over classes with positives and mIoU
  (`lalign.probe.metrics`), as the patch probe reports them. The penalty is `ridge` on standardized features, so a
  per-feature scale and shift (the student's re-initialized final LayerNorm) changes nothing: at step 0 the student
  scores what its teacher scores. A proxy for the paper's probe (2 transformer blocks, BCE, read at 0.5: 0.58 for
  the demo teacher, where this reads 0.72), meant for the student *relative to its teacher* during training.
- Agreement (always; the one signal without labels): the mean cosine similarity between the student's and the
  teacher's tokens of each patch of the first validation batch, each feature standardized over that batch first
  (so the re-initialized LayerNorm's scale and shift count for nothing): 1 at step 0, lower as the student moves.

Everything runs on the training mesh: the watch images are batches sharded as training batches are (each host
builds its own rows), the sums the probe needs (X^T X, X^T Y, confusion counts) are reduced on the devices and
replicated, and the small solve runs on every host in float64, so every host computes the same numbers; process 0
logs them. Nothing runs in the training step: only at validation.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lalign import sharding
from lalign.data import segmentation as seg
from lalign.data.images import device_normalize, run_normalization
from lalign.data.scenes import scenes_from_config
from lalign.log import info
from lalign.probe.metrics import metrics_from_counts

SOURCES = ("", "scenes", "folder", "coco_stuff", "ade20k")
HI = jax.lax.Precision.HIGHEST  # float32 sums on every backend (a TPU's default matmul rounds to bfloat16)


def options(config) -> dict:
    """`config.watch` as a plain dict (its fields and defaults: lalign/config.py)."""
    return config.watch.to_dict() if hasattr(config.watch, "to_dict") else dict(config.watch)


def labelled(opts: dict) -> bool:
    return (opts["source"] == "scenes" or (opts["source"] == "folder" and bool(opts["images"]))
            or (opts["source"] in ("coco_stuff", "ade20k") and bool(opts["root"])))


def config_errors(config) -> list[str]:
    """What `config.watch` needs of the rest of the config (empty: fine), in validate.config_errors' words. Each
    field's own rule is checked with the others' (lalign/config.py)."""
    o, errors = options(config), []
    if o["source"] == "scenes" and config.data.get("name") != "scenes":
        errors.append(f"config.watch.source 'scenes' needs config.data.name 'scenes' (their patch grid and "
                      f"classes), got {config.data.get('name')!r}; use 'folder' for real images")
    if o["source"] == "folder" and o["images"] and (not o["labels"] or not o["num_classes"]):
        errors.append("config.watch.source 'folder' needs watch.labels (label PNGs) and watch.num_classes beside "
                      f"watch.images, got labels={o['labels']!r}, num_classes={o['num_classes']!r}")
    return errors


# ---------------------------------------------------------------------------------------------- the probe's math
def _rows(feats, weight):
    """(B, P, D) tokens and (B,) row weights -> (B*P, D+1) [token, 1] and (B*P,) weights."""
    x = feats.reshape(-1, feats.shape[-1]).astype(jnp.float32)
    x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), jnp.float32)], axis=1)
    return x, jnp.repeat(jnp.asarray(weight, jnp.float32), feats.shape[1])


def gram(feats, labels, weight):
    """The ridge probe's sums over the patches of rows with weight 1: (X^T X, X^T Y) with X = [token, 1] (D+1
    columns) and Y the (P, C) multi-hot patch labels."""
    x, w = _rows(feats, weight)
    y = labels.reshape(-1, labels.shape[-1]).astype(jnp.float32)
    xw = x * w[:, None]
    return jnp.dot(xw.T, x, precision=HI), jnp.dot(xw.T, y, precision=HI)


def solve(xtx, xty, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """The probe from its sums, in float64: ridge weights (D+1, C) with penalty `ridge` * n * var_d on feature d
    (ridge on standardized features, so the solution follows any per-feature scale and shift) and none on the
    bias; and per-class thresholds (C,): the midpoint between the mean score of the class's fitted patches and that
    of the other fitted patches (inf for a class without fitted patches: never predicted)."""
    a, b = np.asarray(xtx, np.float64), np.asarray(xty, np.float64)
    d, n = a.shape[0] - 1, max(float(a[-1, -1]), 1.0)
    var = np.maximum(np.diag(a)[:d] - a[-1, :d] ** 2 / n, 0.0)  # n * the variance of each feature
    floor = 1e-9 * max(float(var.mean()), 1e-30)  # constant features: a tiny penalty keeps the system solvable
    penalty = np.concatenate([ridge * np.maximum(var, floor), [0.0]])
    w = np.linalg.solve(a + np.diag(penalty), b)
    positives = b[-1]  # the bias column of X^T Y counts each class's patches
    on, total = (b * w).sum(0), a[-1] @ w  # summed scores: over a class's patches, over all patches
    mean_on = on / np.maximum(positives, 1)
    mean_off = (total - on) / np.maximum(n - positives, 1)
    return w, np.where(positives > 0, (mean_on + mean_off) / 2, np.inf)


def confusion(feats, labels, weight, w, threshold):
    """(3, C): per-class true positives, false positives and false negatives of the probe `w` (D+1, C) read at
    `threshold` (C,), over the patches of rows with weight 1."""
    x, rw = _rows(feats, weight)
    pred = (jnp.dot(x, jnp.asarray(w, jnp.float32), precision=HI) > threshold).astype(jnp.float32)
    true = (labels.reshape(-1, labels.shape[-1]) > 0.5).astype(jnp.float32)
    rw = rw[:, None]
    return jnp.stack([(rw * pred * true).sum(0), (rw * pred * (1 - true)).sum(0), (rw * (1 - pred) * true).sum(0)])


def counts_metrics(counts) -> dict:
    """{macro_recall, miou} of (3, C) confusion counts."""
    c = np.asarray(counts, np.float64)
    m = metrics_from_counts({"tp": c[0], "fp": c[1], "fn": c[2]})
    return {"macro_recall": m["macro_recall"], "miou": m["miou"]}


def probe(feats, labels, fit_fraction: float = 0.5, ridge: float = 1e-3) -> dict:
    """The meter's probe on arrays in memory: feats (n, P, D), labels (n, P, C); fitted on the first
    `fit_fraction` of the n examples, read on the rest. What `Watch` computes on the mesh, batch by batch."""
    n = len(feats)
    fit = np.arange(n) < max(1, min(n - 1, round(n * fit_fraction)))
    w, threshold = solve(*gram(feats, labels, fit), ridge)
    return counts_metrics(confusion(feats, labels, ~fit, w, threshold))


def agreement(student, teacher):
    """Mean cosine similarity of matching patch tokens (B, P, D) of two backbones, each feature standardized over
    all the patches first."""
    def standardized(t):
        x = t.reshape(-1, t.shape[-1]).astype(jnp.float32)
        x = x - x.mean(0)
        return x * jax.lax.rsqrt((x * x).mean(0) + 1e-12)

    a, b = standardized(student), standardized(teacher)
    cos = (a * b).sum(-1) * jax.lax.rsqrt((a * a).sum(-1) * (b * b).sum(-1) + 1e-12)
    return cos.mean()


def warning(student: dict, teacher: dict, margin: float) -> Optional[str]:
    """The log line when the student's macro recall is more than `margin` below its teacher's, else None."""
    gap = teacher["macro_recall"] - student["macro_recall"]
    if not gap > margin:
        return None
    return (f"WARNING: the student's watch recall {student['macro_recall']:.3f} is {100 * gap:.1f} points below its "
            f"teacher's {teacher['macro_recall']:.3f} (watch.margin {100 * margin:.1f}): its patch features are "
            f"losing what the teacher's hold. A learning rate too large for the batch does this "
            f"(optimizer.lr_base_batch, lr_scale_rule).")


# ------------------------------------------------------------------------------------------------ on the mesh
class Watch:
    """Built once before training (the teacher's probe and tokens computed then); `measure(params)` at each
    validation returns the fields to log: watch_agreement, and with labels watch_recall, watch_miou,
    watch_teacher_recall, watch_teacher_miou."""

    def __init__(self, config, teacher, teacher_params, model, mesh, agreement_images):
        self.opts = opts = options(config)
        self.mesh = mesh
        batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        rules = tuple(config.sharding_rules) or sharding.DEFAULT_RULES
        dtype = config.maskembed.student_dtype
        backbone = teacher.clone(pool_type="none", num_classes=None, class_token=teacher.has_class_token,
                                 dtype=jnp.dtype(dtype) if dtype else None)
        prefix = teacher.num_prefix_tokens
        pixels = run_normalization(config.data)  # the validation batch's uint8 pixels; the watch set's are float

        def teacher_tokens(p, x):
            x = device_normalize(x, pixels)
            return backbone.apply({"params": p}, x)[1]["encoded"][:, prefix:].astype(jnp.float32)

        def student_tokens(p, x):
            return model.features(p, device_normalize(x, pixels))[:, prefix:].astype(jnp.float32)

        self._teacher_tokens = jax.jit(teacher_tokens, out_shardings=batch_sh)
        self._student_tokens = jax.jit(student_tokens, out_shardings=batch_sh)
        self._gram = jax.jit(gram, out_shardings=repl)
        self._confusion = jax.jit(confusion, out_shardings=repl)
        self._agreement = jax.jit(agreement, out_shardings=repl)
        self._repl = repl

        t0 = time.time()
        params = jax.device_put(teacher_params, sharding.tree_shardings(teacher_params, mesh, rules))
        self.agreement_images = agreement_images
        self.teacher_agreement_tokens = self._teacher_tokens(params, agreement_images)
        self.batches, self.teacher, self.source = [], None, "no labels"
        if labelled(opts):
            self.batches, self.source = watch_batches(config, teacher.patch_size[0], mesh)
            self.teacher = self._probe(functools.partial(self._teacher_tokens, params))
        del params
        what = (f"patch probe on {self.source}: teacher macro recall {self.teacher['macro_recall']:.4f}, mIoU "
                f"{self.teacher['miou']:.4f}" if self.teacher else
                "no labelled set (config.watch): the student's agreement with its teacher's tokens only")
        info(f"[watch] {what} [{time.time() - t0:.0f}s]")

    def _probe(self, tokens: Callable) -> dict:
        feats, xtx, xty = [], 0, 0
        for b in self.batches:
            f = tokens(b["image"])
            g = self._gram(f, b["labels"], b["fit"])
            xtx, xty = xtx + g[0], xty + g[1]
            feats.append(f)
        w, threshold = jax.device_put([a.astype(np.float32) for a in solve(
            jax.device_get(xtx), jax.device_get(xty), self.opts["ridge"])], self._repl)
        counts = sum(self._confusion(f, b["labels"], b["eval"], w, threshold) for f, b in zip(feats, self.batches))
        return counts_metrics(jax.device_get(counts))

    def measure(self, params) -> dict:
        """The fields to log for the student `params` (the train state's params)."""
        out = {"watch_agreement": float(self._agreement(self._student_tokens(params, self.agreement_images),
                                                        self.teacher_agreement_tokens))}
        if self.teacher:
            student = self._probe(lambda x: self._student_tokens(params, x))
            out.update(watch_recall=student["macro_recall"], watch_miou=student["miou"],
                       watch_teacher_recall=self.teacher["macro_recall"], watch_teacher_miou=self.teacher["miou"])
        return out

    def describe(self, m: dict) -> str:
        """The progress line's part: ' | watch recall 0.512 (teacher 0.530) | agreement 0.93'."""
        recall = (f" | watch recall {m['watch_recall']:.3f} (teacher {m['watch_teacher_recall']:.3f})"
                  if "watch_recall" in m else "")
        return f"{recall} | agreement {m['watch_agreement']:.3f}"

    def warning(self, m: dict) -> Optional[str]:
        if "watch_recall" not in m:
            return None
        return warning({"macro_recall": m["watch_recall"]}, {"macro_recall": m["watch_teacher_recall"]},
                       self.opts["margin"])


def watch_batches(config, patch_size: int, mesh) -> tuple[list[dict], str]:
    """The labelled watch set as batches on the mesh: [{'image', 'labels' (B, P, C), 'fit' (B,), 'eval' (B,)}],
    each host building only its rows; padding rows and unreadable examples weigh 0. Returns (batches, what)."""
    opts = options(config)
    get, n, what = _source(config, opts, patch_size)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    bs = shards * math.ceil(min(opts["batch_size"], n) / shards)
    index, count = sharding.host_shard(bs, mesh)
    local = bs // count
    n_fit = max(1, min(n - 1, round(n * opts["fit_fraction"])))
    batches = []
    for start in range(0, n, bs):
        rows = np.arange(start + index * local, start + (index + 1) * local)
        images, labels, ok = get([int(r) for r in rows if r < n])
        pad = local - len(images)
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
        labels = np.concatenate([labels, np.zeros((pad, *labels.shape[1:]), labels.dtype)])
        ok = np.concatenate([ok, np.zeros(pad, bool)])
        batches.append({"image": sharding.put_batch(images, mesh), "labels": sharding.put_batch(labels, mesh),
                        "fit": sharding.put_batch((ok & (rows < n_fit)).astype(np.float32), mesh),
                        "eval": sharding.put_batch((ok & (rows >= n_fit)).astype(np.float32), mesh)})
    return batches, f"{what} ({n_fit} fit, {n - n_fit} read)"


def _source(config, opts: dict, patch_size: int):
    """(get(indices) -> (images (k, S, S, 3) float32, patch labels (k, P, C) uint8, readable (k,) bool), number
    of examples, a description)."""
    if opts["source"] == "scenes":
        scenes = scenes_from_config(config.data, "probe_val", seed=config.seed)  # the run's own, as its probe

        def get_scenes(idx):
            if not idx:
                c, p = scenes.spec.num_classes, scenes.spec.grid ** 2
                s = scenes.spec.image_size
                return np.zeros((0, s, s, 3), np.float32), np.zeros((0, p, c), np.uint8), np.zeros(0, bool)
            ex = scenes.examples(idx[0], len(idx))  # a host's rows are contiguous
            return ex["image"], ex["patch_labels"].astype(np.uint8), np.ones(len(idx), bool)

        n = opts["num_images"]
        return get_scenes, n, f"scenes/probe_val, {n} images"

    kw = dict(image_size=config.data.image_size, patch_size=patch_size, label_rule=opts["label_rule"],
              min_pixels=opts["min_pixels"], normalization=_normalization(config))
    if opts["source"] == "folder":
        ds = seg.SegmentationFolder(opts["images"], opts["labels"], num_classes=opts["num_classes"],
                                    ignore_index=opts["ignore_index"], name=f"watch folder {opts['images']}", **kw)
    elif opts["source"] == "coco_stuff":
        ds = seg.coco_stuff(opts["root"], "val2017", **kw)
    else:
        ds = seg.ade20k(opts["root"], "validation", **kw)
    n = min(opts["num_images"], len(ds))
    chosen = np.sort(np.random.default_rng(0).permutation(len(ds))[:n])  # a fixed random subset
    p, c = ds.grid ** 2, ds.num_classes

    def get_folder(idx):
        images = np.zeros((len(idx), ds.image_size, ds.image_size, 3), np.float32)
        labels, ok = np.zeros((len(idx), p, c), np.uint8), np.zeros(len(idx), bool)
        at = {int(chosen[i]): k for k, i in enumerate(idx)}
        for rec in ds.iterate([int(chosen[i]) for i in idx]):  # unreadable examples: skipped with a warning
            k = at[rec["index"]]
            images[k], labels[k], ok[k] = rec["image"], rec["patch_labels"], True
        return images, labels, ok

    return get_folder, n, f"{ds.name}, {n} of {len(ds)} images"


def _normalization(config) -> str:
    name = config.data.get("normalization") or ""
    if name not in seg.NORMALIZATIONS:
        raise ValueError(f"config.watch: the watch images need the run's normalization, but config.data."
                         f"normalization is {name!r} (one of {sorted(seg.NORMALIZATIONS)} expected).")
    return name
