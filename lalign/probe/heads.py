"""The probes trained on frozen features: the patch probe (locality), the linear image probe (global knowledge
kept) and the background-token probe (how global one patch's token is)."""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lalign import config as config_lib
from lalign.cost_model import block_saved
from lalign.log import info
from lalign.models.token_heads import PatchProbe
from lalign.probe.metrics import (add_counts, improves, metrics_from_counts, patch_counts,
                                  selection_metric)


EVAL_BUDGET = 2**30  # an evaluation chunk's activations stay within max(this, a training step's)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def eval_chunk(sizes, cap: int, fit: int = 0) -> int:
    """The one evaluation shape for splits of `sizes` examples: the smallest split rounded up to a power of two,
    at most `cap` and at most the power of two at or below `fit` (the rows that fit the memory budget; 0: no
    limit). A small split is padded to what it needs, not to `cap` (a 21-image split: 32 rows); a larger one runs
    in chunks of that size, its last chunk padded, so every split shares one compiled program. Powers of two keep
    the shapes few, and the demo's 500 / 1,000-image splits at the 512 rows they always had."""
    chunk = min(int(cap), _pow2_ceil(min([int(s) for s in sizes if s > 0] or [1])))
    if fit:
        chunk = min(chunk, 1 << (max(1, int(fit)).bit_length() - 1))
    return max(1, chunk)


def padded_chunks(x, y, chunk: int):
    """(features, labels) of a split in pieces of `chunk` rows read from the store as they are needed (memmaps
    stay on disk); the features of the last piece padded with zeros to `chunk` rows."""
    for i in range(0, len(x), chunk):
        xs, labels = np.asarray(x[i:i + chunk]), np.asarray(y[i:i + chunk])
        if len(xs) < chunk:
            xs = np.concatenate([xs, np.zeros((chunk - len(xs), *xs.shape[1:]), xs.dtype)])
        yield xs, labels


def probe_memory(num_patches: int, width: int, num_heads: int, num_classes: int, cfg, num_seeds: int,
                 eval_sizes) -> dict:
    """The probe's programs, sized (float32 bytes) by lalign.memory's activation model of a pre-LN block:
    'state' = parameters, gradients and AdamW's two moments of every seed; 'step' = what autodiff keeps for one
    training step of `cfg.batch_size` images per seed (every block's saved activations, the input, the logits);
    'eval' = one evaluation chunk's working set (one block at a time, the probabilities of every seed) at
    'chunk' = `eval_chunk` of the `eval_sizes` splits, limited to the rows whose activations fit in the larger of
    a training step's and `EVAL_BUDGET`, so evaluating never needs much more than training does. An estimate:
    XLA:CPU's temporaries run 1.4-1.7x above this model (lalign/memory.py)."""

    cfg = config_lib.completed(cfg, config_lib.PROBE)

    t, d, c, b = num_patches, width, num_classes, 4
    f = 4 * d
    model = PatchProbe(num_classes=num_classes, num_heads=num_heads, depth=cfg.depth)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, t, d), jnp.float32))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    step = (cfg.depth * block_saved(t, d, f, num_heads, b, 1) + b * t * d + 3 * b * t * c) * cfg.batch_size * num_seeds
    per_image_eval = b * t * (4 * d + f) + num_heads * t * t * (4 + b) + b * t * c * num_seeds
    chunk = eval_chunk(eval_sizes, cfg.eval_batch_size,
                       fit=int(max(step, EVAL_BUDGET) // per_image_eval))
    return {"params": params, "state": 4 * b * params * num_seeds, "step": step, "chunk": chunk,
            "eval": per_image_eval * chunk}


def probe_schedule(cfg, num_train: int) -> dict:
    """The probe's step count and warm-up for `num_train` training examples, and a log line about them.

    Warm-up is `cfg.warmup_steps` (the paper's 500), at most `cfg.warmup_fraction` of all steps when that is set:
    the paper's 500 steps are sized for COCO-Stuff (5 epochs of ~113k images, ~17,700 steps); 5 epochs of a
    small data set (CamVid's 367 images: 60 steps) would never leave warm-up. At 0.2 the paper's 500 steps stay
    exactly as they are on COCO-Stuff and ADE20K (2,850 steps); unset, warm-up is `cfg.warmup_steps` alone.
    Always less than the total, so the cosine decay has a step."""
    cfg = config_lib.completed(cfg, config_lib.PROBE)
    steps_per_epoch = math.ceil(num_train / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup, fraction = int(cfg.warmup_steps), cfg.warmup_fraction
    sized = fraction and round(fraction * total) < warmup
    if sized:
        warmup = max(1, round(fraction * total))
    warmup = max(0, min(warmup, total - 1))
    line = (f"[probe] schedule: {total} steps ({cfg.epochs} epochs x {steps_per_epoch} of batch {cfg.batch_size}), "
            f"warm-up {warmup}" + (f" ({fraction:g} of the steps: probe.warmup_steps {cfg.warmup_steps} is sized for "
                                   f"COCO-scale data)" if sized else ""))
    if total < cfg.warmup_steps:
        line += (f"; WARNING: a very short schedule ({total} steps, fewer than probe.warmup_steps "
                 f"{cfg.warmup_steps}): raise probe.epochs for a probe that converges")
    if warmup >= total / 2:
        line += f"; WARNING: mostly warm-up ({warmup} of {total} steps): the learning rate is at its peak only briefly"
    return {"steps_per_epoch": steps_per_epoch, "total": total, "warmup": warmup, "line": line}


def train_patch_probe(train, val, test, cfg, seed: int, num_heads: int,
                      log: Optional[Callable[[dict], None]] = None) -> dict:
    """train/val/test: (features (N, P, D), labels (N, P, C)). Returns the test metrics at the best val epoch.

    Features may be float16 and labels uint8 (cast to float32 on the device), and numpy memmaps (a split larger
    than memory); evaluation streams over the split. `log`, if given, receives each epoch's history record.
    One seed of `train_patch_probe_seeds`."""
    return train_patch_probe_seeds(train, val, test, cfg, [seed], num_heads,
                                   None if log is None else (lambda _, h: log(h)))[0]


def seeds_train_step(model: PatchProbe, tx: optax.GradientTransformation) -> Callable:
    """One jitted training step of every seed: `step(params, opt_state, xs, ys)` -> (params, opt_state, losses)
    with lists over seeds and xs, ys of shape (seeds, B, ...); the parameters and optimizer state are donated.
    Each seed's step is its own copy of the one-seed computation (`train_patch_probe_seeds` says why)."""

    def one_step(params, opt_state, x, y):
        x, y = x.astype(jnp.float32), y.astype(jnp.float32)

        def loss_fn(p):
            return optax.sigmoid_binary_cross_entropy(model.apply({"params": p}, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, xs, ys):  # lists over seeds; xs, ys: (seeds, B, ...)
        out = [one_step(p, o, xs[k], ys[k]) for k, (p, o) in enumerate(zip(params, opt_state))]
        return [o[0] for o in out], [o[1] for o in out], jnp.stack([o[2] for o in out])

    return step


def seeds_evaluate(model: PatchProbe, num_seeds: int, chunk: int) -> Callable:
    """`evaluate(params, (features, labels))` -> each seed's patch metrics on the split, streamed through one
    jitted prediction of every seed in padded pieces of `chunk` rows (`padded_chunks`)."""
    predict = jax.jit(lambda params, x: jnp.stack(
        [jax.nn.sigmoid(model.apply({"params": p}, x.astype(jnp.float32))) for p in params]))

    def evaluate(params, split):
        counts = [None] * num_seeds
        for xs, labels in padded_chunks(*split, chunk):
            probs = np.asarray(predict(params, jnp.asarray(xs)))[:, :len(labels)]
            counts = [add_counts(c, patch_counts(probs[k], labels)) for k, c in enumerate(counts)]
        return [metrics_from_counts(c) for c in counts]

    return evaluate


def train_patch_probe_seeds(train, val, test, cfg, seeds, num_heads: int,
                            log: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """`train_patch_probe` for every seed of `seeds` at once: one compiled program trains all of them side by side,
    each with its own initialization and data order, so the results equal the seeds trained one by one up to
    float rounding. Each seed's step is its own copy of the one-seed computation inside that program, not a
    `jax.vmap`: on XLA:CPU the plain matmuls run 10-20% faster than the batched ones vmap makes, and the seeds
    still share one dispatch per step. The epoch is chosen by `cfg.select_by` on the validation split (validation
    mIoU by default; 'recall', the paper's metric, is an option: metrics.SELECT_BY says why not the default), and
    the test split is evaluated only at epochs where some seed's score improves (the result is the test metrics
    at the chosen epoch). `log(seed, record)` receives each seed's epoch record: epoch, loss, val_macro_recall,
    val_miou, val_predicted_positive_rate. Fields `cfg` leaves out take their defaults (lalign/config.py, PROBE)."""
    cfg = config_lib.completed(cfg, config_lib.PROBE)
    seeds = list(seeds)
    select_by = cfg.select_by
    score = selection_metric(select_by)
    x_train, y_train = train
    num_classes = y_train.shape[-1]
    model = PatchProbe(num_classes=num_classes, num_heads=num_heads, depth=cfg.depth)
    plan = probe_schedule(cfg, len(x_train))
    info(plan["line"])
    steps_per_epoch, total = plan["steps_per_epoch"], plan["total"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, plan["warmup"], total, cfg.lr * cfg.lr_min_ratio)
    tx = optax.adamw(schedule, weight_decay=cfg.wd)
    example = jnp.asarray(x_train[:1], jnp.float32)
    params = [model.init(jax.random.key(s), example)["params"] for s in seeds]
    opt_state = [tx.init(p) for p in params]
    step = seeds_train_step(model, tx)
    chunk = probe_memory(x_train.shape[1], x_train.shape[2], num_heads, num_classes, cfg, len(seeds),
                         (len(val[0]), len(test[0])))["chunk"]
    evaluate = seeds_evaluate(model, len(seeds), chunk)

    rngs = [np.random.default_rng(s) for s in seeds]
    histories, best = [[] for _ in seeds], [None] * len(seeds)
    for epoch in range(cfg.epochs):
        orders = [rng.permutation(len(x_train)) for rng in rngs]
        for i in range(steps_per_epoch):
            idx = [o[i * cfg.batch_size:(i + 1) * cfg.batch_size] for o in orders]
            x = jnp.asarray(np.stack([x_train[j] for j in idx]))
            y = jnp.asarray(np.stack([y_train[j] for j in idx]))
            params, opt_state, loss = step(params, opt_state, x, y)
        vs, losses = evaluate(params, val), np.asarray(loss)
        improved = [improves(v[score], None if b is None else b[0][score]) for v, b in zip(vs, best)]
        ts = evaluate(params, test) if any(improved) else None
        for k, seed in enumerate(seeds):
            histories[k].append({"epoch": epoch + 1, "loss": float(losses[k]),
                                 "val_macro_recall": vs[k]["macro_recall"], "val_miou": vs[k]["miou"],
                                 "val_predicted_positive_rate": vs[k]["predicted_positive_rate"]})
            if log is not None:
                log(seed, histories[k][-1])
            if improved[k]:
                best[k] = (vs[k], ts[k], epoch + 1)
    return [{**t, "val_macro_recall": v["macro_recall"], "val_miou": v["miou"], "best_epoch": e,
             "selected_by": select_by, "steps": total, "warmup_steps": plan["warmup"], "history": h}
            for (v, t, e), h in zip(best, histories)]


def image_linear_probe(train, test, c: float = 1.0) -> dict:
    """Logistic regression (one per class) on mean-pooled features -> macro AP on the test split."""
    # heavy (over a second to import): only the image probe needs scikit-learn's models
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
    idx, chosen = [], []
    step = max(1, 2**24 // (num_patches * num_patches))  # images at a time: (step, P, P) distances, ~128 MB
    for i in range(0, n, step):  # streamed: the labels of a memmap store are read a piece at a time
        labelled = np.asarray(patch_labels[i:i + step]).reshape(-1, num_patches,
                                                                  np.shape(patch_labels)[-1]).max(-1) > 0.5
        keep = np.flatnonzero(labelled.any(1) & ~labelled.all(1))
        far = np.where(labelled[keep, None, :], dist[None], np.inf).min(-1)  # distance of each patch to an object
        far = np.where(labelled[keep], -1.0, far)
        idx.append(i + keep)
        chosen.append(far.argmax(1))
    idx, chosen = np.concatenate(idx).astype(np.int64), np.concatenate(chosen).astype(np.int64)
    return np.asarray(feats[idx, chosen]), idx


def background_token_probe(train, test) -> float:
    """Globalness: image-label mAP of a linear probe on one background token per image (`background_tokens`);
    `train`, `test` = (patch features (N, P, D), patch labels (N, P, C), image labels (N, C)). Near the pooled
    features' mAP: every token carries the whole image's content; low: the tokens are local."""
    data = []
    for feats, patch_labels, labels in (train, test):
        x, idx = background_tokens(feats, patch_labels)
        data.append((x, np.asarray(labels)[idx]))
    return image_linear_probe(*data)["map"]
