"""A frozen backbone and its patch features: finding and loading it, the image size it was trained at, and one pass
over a probe split that stores the features in memory or as memmaps on disk."""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lalign.checkpoints import hub
from lalign.checkpoints.common import grid_of, patch_rows, square_grid
from lalign.checkpoints.load import POSEMB_RESIZE, checkpoint_normalization, fit_posemb, guess_format, load_any
from lalign.checkpoints.normalization import AUTO_NORMALIZATION, family_normalization
from lalign.data.images import device_normalize
from lalign.data.probe_splits import ProbeSplit
from lalign.log import info


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
    path = resolve_backbone(hub.resolve(path).path)  # a hub id or bucket URL: fetched once into a local cache
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
    grid, _ = square_grid(patch_rows(model, np.shape(pos)[1]), "pos_embedding", ": set config.data.image_size")
    return grid * int(model.patch_size[0])


def fit_to_image_size(model, params, image_size: int, how: str) -> tuple[dict, Optional[tuple[int, int]]]:
    """(params whose learned position table fits `image_size`'s patch grid, the checkpoint's grid where it was
    resized else None). The table is resized by `checkpoints.load.fit_posemb`, the function training applies to
    its teacher (`config.init_posemb_resize`), so a backbone is probed at the grid it would be trained at."""
    if how not in POSEMB_RESIZE:
        raise ValueError(f"config.posemb_resize={how!r}; choose from {POSEMB_RESIZE}.")
    if "pos_embedding" not in params:
        return params, None
    old = grid_of(params, model)
    params = fit_posemb(model, params, image_size, how)
    new = grid_of(params, model)
    want = grid_of(params, model, image_size)
    if new != want:
        raise ValueError(f"config.posemb_resize={how!r} keeps the backbone's {new[0]}x{new[1]} position table, but "
                         f"config.data.image_size={image_size} needs {want[0]}x{want[1]}: choose one of "
                         f"{[h for h in POSEMB_RESIZE if h != 'none']} or image_size "
                         f"{new[0] * int(model.patch_size[0])}.")
    return params, (old if old != new else None)


def make_features_fn(model, params, dtype: str = "", normalization: Optional[str] = None
                     ) -> Callable[[np.ndarray], jax.Array]:
    """images (B, S, S, 3) -> patch tokens (B, N, D) float32 after the final norm, prefix tokens dropped. One
    jitted function; the params are an argument (not constants baked into the program). `dtype`: the compute
    dtype ("": the model's own). uint8 images are normalized on the device with `normalization`
    (`lalign.data.images.device_normalize`); float images, normalized where they were read, pass through."""
    backbone = model.clone(pool_type="none", num_classes=None, class_token=model.has_class_token,
                           **({"dtype": jnp.dtype(dtype)} if dtype else {}))
    params = jax.device_put({k: v for k, v in params.items() if k not in ("MAPHead_0", "head")})
    n_prefix = model.num_prefix_tokens

    @jax.jit
    def fn(p, images):
        images = device_normalize(images, normalization)
        return backbone.apply({"params": p}, images)[1]["encoded"][:, n_prefix:].astype(jnp.float32)

    return lambda images: fn(params, images)


def normalization_for(model, name: str, path: str = "", fmt: str = "") -> str:
    """`name` (config.data.normalization) where set; "" or "auto": what the checkpoint at `path` states
    (`checkpoints.load.checkpoint_normalization`: a HF preprocessor_config.json, a timm / open_clip config, a
    workdir's record), else the model's family. Logged in one line."""
    if name and name not in AUTO_NORMALIZATION:
        return name
    name, source = checkpoint_normalization(path, fmt or None) if path else family_normalization(model)
    info(f"[probe] normalization '{name}' from {source} (config.data.normalization sets another)")
    return name


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
        images = np.asarray(batch["image"])
        if images.dtype != np.uint8:  # uint8: normalized by `features_fn` on the device
            images = images.astype(np.float32, copy=False)
        b = len(images)
        if b < batch_size:  # pad: one compiled shape for every batch
            images = np.concatenate([images, np.zeros((batch_size - b, *images.shape[1:]), images.dtype)])
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


def features_of(features_fn: Callable, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """`features_fn` (images -> patch tokens) over an array of images in batches, as float32 numpy."""
    return np.concatenate([np.asarray(features_fn(np.asarray(images[i:i + batch_size])), np.float32)
                           for i in range(0, len(images), batch_size)])
