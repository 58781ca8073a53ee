"""What dropping the attention soft-cap does to a student trained with it.

The reference trains its students with attention logits capped by `c * tanh(x / c)` (c = 30, its `svit_*`
models). Hugging Face, timm and open_clip attention have no cap, so a capped student is exported without it. The
cap changes a logit by less than 1% while |x| < 0.174 c (5.2 for c = 30), so what matters is how many logits of
the student, on real images, lie beyond that, and how far the exported features move:

    stats = measure(model, params, images)   # {'max_abs_logit', 'frac_beyond', 'feature_drift', ...}

`lalign.export` measures this for every capped student before it writes an uncapped format, and refuses unless
--allow-softcap-drop, with the numbers in the message either way.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lalign.checkpoints.common import scan_to_blocks
from lalign.data import image_folder
from lalign.data import images as images_lib
from lalign.data import scenes
from lalign.models.vit import ViT

REL_TOL = 0.01  # a logit is "changed by the cap" when c*tanh(x/c) differs from x by more than this fraction


def threshold(cap: float, rel_tol: float = REL_TOL) -> float:
    """The |x| beyond which c*tanh(x/c) is more than `rel_tol` below x (bisection on 1 - tanh(u)/u)."""
    lo, hi = 1e-6, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - math.tanh(mid) / mid < rel_tol else (lo, mid)
    return cap * lo


def _layernorm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def attention_logits(model: ViT, params, images) -> list:
    """Per block, the attention logits q.k/sqrt(d) (B, H, T, T) the capped model computes before its cap."""
    p = scan_to_blocks(jax.tree.map(np.asarray, params))
    _, aux = model.apply({"params": p}, images)
    x = aux["with_posemb"]
    if model.pre_norm:
        x = _layernorm(x, p["pre_norm"], model.ln_eps)
    out = []
    for i in range(model.depth):
        block = p["Transformer"][f"encoderblock_{i}"]
        y = _layernorm(x, block["LayerNorm_0"], model.ln_eps)
        a = block["MultiHeadDotProductAttention_0"]
        q = jnp.einsum("btd,dhk->bthk", y, a["query"]["kernel"]) + a["query"]["bias"]
        k = jnp.einsum("btd,dhk->bthk", y, a["key"]["kernel"]) + a["key"]["bias"]
        out.append(jnp.einsum("bqhk,bthk->bhqt", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k))
        x = aux[f"block{i:02d}"]
    return out


def measure(model: ViT, params, images, rel_tol: float = REL_TOL) -> dict:
    """How much of `model`'s attention (it has `attn_softcap` set) the cap acts on for `images`, and how far the
    final tokens move when it is dropped (relative to their RMS)."""
    if model.attn_softcap is None:
        raise ValueError("This model has no attention soft-cap (attn_softcap is None).")
    cap = float(model.attn_softcap)
    images = jnp.asarray(images, jnp.float32)
    logits = np.concatenate([np.abs(np.asarray(lg)).ravel() for lg in attention_logits(model, params, images)])
    t = threshold(cap, rel_tol)
    capped = np.asarray(model.apply({"params": params}, images)[1]["encoded"], np.float64)
    plain = np.asarray(model.clone(attn_softcap=None).apply({"params": params}, images)[1]["encoded"], np.float64)
    rms = float(np.sqrt(np.mean(capped ** 2)))
    diff = np.abs(plain - capped)
    return {"cap": cap, "threshold": t, "num_images": int(images.shape[0]), "num_logits": int(logits.size),
            "max_abs_logit": float(logits.max()), "frac_beyond": float(np.mean(logits > t)),
            "feature_drift_max": float(diff.max() / rms), "feature_drift_rms": float(np.sqrt(np.mean(diff ** 2)) / rms)}


def describe(stats: dict) -> str:
    return (f"on {stats['num_images']} images, {100 * stats['frac_beyond']:.3g}% of the attention logits lie beyond "
            f"+-{stats['threshold']:.2f}, where the cap {stats['cap']:g}*tanh(x/{stats['cap']:g}) changes them by more "
            f"than 1% (largest |logit| {stats['max_abs_logit']:.3g}); without the cap the output tokens move by "
            f"{100 * stats['feature_drift_rms']:.3g}% of their RMS (at most {100 * stats['feature_drift_max']:.3g}%)")


def sample_images(model: ViT, image_size: int, directory: Optional[str] = None, normalization: str = "siglip",
                  count: int = 16) -> tuple[np.ndarray, str]:
    """(images, where they came from): the first `count` images of the folder `directory` (found as the image-folder
    source finds them; centre crop, as validation images), else `count` of the embedded scenes at `image_size` (a
    proxy for real images)."""
    if directory:
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"--softcap-images {directory}: not a directory.")
        names = image_folder.list_images(directory)[:count]
        opts = dict(images_lib.COMMON_OPTIONS)
        batch = []
        for name in names:
            with open(os.path.join(directory, name), "rb") as f:
                batch.append(images_lib.decode_and_crop(f.read(), image_size, False, None, opts))
        return images_lib.normalize(np.stack(batch), normalization), f"{len(names)} images of {directory}"
    patch = int(model.patch_size[0])
    spec = scenes.SceneSpec(image_size=image_size, patch_size=patch, max_objects=4,
                            digit_size=(max(4, image_size // 6), max(5, image_size // 3)))
    rng = np.random.default_rng(0)
    return (np.stack([scenes.make_scene(rng, spec, "train")[0] for _ in range(count)]).astype(np.float32),
            f"{count} embedded scenes (pass --softcap-images DIR to measure on real images)")
