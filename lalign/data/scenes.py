"""The embedded data set: synthetic scenes of handwritten digits on textured backgrounds. No download.

Each scene places 1..`max_objects` digits (scikit-learn's 8x8 digits, rescaled and coloured) at random positions
on a random texture (two sinusoidal gratings plus noise). Every scene comes with
- image-level labels (which digit classes appear): what the teacher is trained on, as CLIP/SigLIP are trained
  without local supervision;
- a segmentation map and per-patch multi-hot labels: what the patch probe is measured on.

Scenes are a pure function of (seed, split, index), so any batch can be rebuilt exactly (resume needs only the
step). The `probe_test` split draws digits from instances that no other split uses: held-out handwriting.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np

from lalign.data.images import random_resized_crop_box

SPLITS = {"pretrain": 0, "maskembed": 1, "probe_train": 2, "probe_val": 3, "probe_test": 4, "maskembed_val": 5}
HELD_OUT_FRACTION = 0.25  # of the 1797 digit instances, used only by probe_test.


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    image_size: int = 48
    patch_size: int = 8
    min_objects: int = 1
    max_objects: int = 4
    digit_size: tuple[int, int] = (12, 20)  # min, max side in pixels
    num_colours: int = 1  # >1: classes are digit x colour (a fixed palette), i.e. 10 * num_colours classes
    min_patch_pixels: int = 4  # a patch has a class when at least this many of its pixels show that object
    max_overlap: float = 0.2  # reject placements whose box overlaps an earlier one by more than this fraction

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_classes(self) -> int:
        return 10 * self.num_colours


PALETTE = np.array([[1.0, 0.15, 0.1], [0.1, 0.5, 1.0], [1.0, 0.9, 0.1], [0.2, 0.9, 0.3], [0.9, 0.2, 0.9],
                    [0.1, 0.9, 0.9]], np.float32)


@functools.lru_cache(maxsize=1)
def _digit_pools() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images, labels), 'test': ...}: the digit instances, the held-out ones for `probe_test`."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(images))
    n_test = int(len(images) * HELD_OUT_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return {"train": (images[train], d.target[train]), "test": (images[test], d.target[test])}


# Rendering runs on the host beside the training step (the demo's 2 cores are shared with XLA), so what a
# scene reuses is computed once: the pixel grid, and each digit's alpha map at each size it is drawn at (the
# demo: at most 1,797 digits x 9 sizes, ~10 MB). Read-only, so a caller cannot change a cached array.
@functools.lru_cache(maxsize=None)
def _unit_grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:s, :s].astype(np.float32) / s
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


@functools.lru_cache(maxsize=None)
def _digit_alpha(pool: str, index: int, size: int) -> np.ndarray:
    alpha = np.clip(_resize(_digit_pools()[pool][0][index], size) * 1.2, 0, 1)
    alpha.flags.writeable = False
    return alpha


def crop_resize(img: np.ndarray, box, size: int) -> np.ndarray:
    """Bilinear resize of the `box` (left, top, right, bottom) of `img` (H, W[, C]) to (size, size)."""
    left, top, right, bottom = box

    def taps(start, length, n):  # the two source pixels and the weight of the second, per output pixel
        coords = start + (np.arange(size) + 0.5) * length / size - 0.5
        c0 = np.clip(np.floor(coords).astype(int), 0, n - 1)
        return c0, np.clip(c0 + 1, 0, n - 1), np.clip(coords - c0, 0, 1)

    r0, r1, fr = taps(top, bottom - top, img.shape[0])
    k0, k1, fk = taps(left, right - left, img.shape[1])
    fr = fr.reshape((-1,) + (1,) * (img.ndim - 1))
    fk = fk.reshape((1, -1) + (1,) * (img.ndim - 2))
    rows = img[r0] * (1 - fr) + img[r1] * fr
    return rows[:, k0] * (1 - fk) + rows[:, k1] * fk


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a square grey image to (size, size)."""
    return crop_resize(img, (0, 0, img.shape[1], img.shape[0]), size)


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _unit_grid(s)
    img = np.empty((s, s, 3), np.float32)
    base = rng.uniform(0.0, 0.6, 3)
    tex = np.zeros((s, s), np.float32)
    for _ in range(2):
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 10), rng.uniform(0, 2 * np.pi)
        tex += np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    tint = rng.uniform(-0.15, 0.15, 3)
    img[:] = base + tint * tex[..., None] / 2
    img += rng.normal(0, 0.04, (s, s, 3))
    return img


def make_scene(rng: np.random.Generator, spec: SceneSpec, pool: str) -> tuple[np.ndarray, np.ndarray, list]:
    """One scene from digits of `pool` ('train' or 'test'): image (S, S, 3) in [-1, 1], segmentation (S, S) int
    (0 = background, c+1 = class c), and the per-object coverage used for patch labels: list of (class, alpha)."""
    s = spec.image_size
    img = _background(rng, s)
    seg = np.zeros((s, s), np.int32)
    images, labels = _digit_pools()[pool]
    boxes, objects = [], []
    n_obj = rng.integers(spec.min_objects, spec.max_objects + 1)
    for _ in range(n_obj):
        for _attempt in range(20):
            size = int(rng.integers(spec.digit_size[0], spec.digit_size[1] + 1))
            y, x = (int(v) for v in rng.integers(0, s - size + 1, 2))
            box = (y, x, y + size, x + size)
            if all(_overlap(box, b) <= spec.max_overlap for b in boxes):
                break
        else:
            continue
        boxes.append(box)
        i = rng.integers(len(images))
        alpha = _digit_alpha(pool, int(i), size)
        colour_id = int(rng.integers(spec.num_colours))
        colour = PALETTE[colour_id] if spec.num_colours > 1 else rng.uniform(0.6, 1.0, 3)
        cls = int(labels[i]) + 10 * colour_id
        region = img[y:y + size, x:x + size]
        region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        seg[y:y + size, x:x + size][alpha > 0.5] = cls + 1
        full = np.zeros((s, s), np.float32)
        full[y:y + size, x:x + size] = alpha
        objects.append((cls, full))
    return np.clip(img, 0, 1) * 2 - 1, seg, objects


def _overlap(a, b) -> float:
    h = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    w = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return h * w / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def patch_labels_from_objects(objects, spec: SceneSpec) -> np.ndarray:
    """(N, C) multi-hot: class c is in a patch when >= min_patch_pixels of its pixels show an object of class c
    (the 'union' rule of the probe: every class present in the patch)."""
    g, p = spec.grid, spec.patch_size
    out = np.zeros((g * g, spec.num_classes), np.float32)
    for cls, alpha in objects:
        counts = (alpha[:g * p, :g * p] > 0.5).reshape(g, p, g, p).sum(axis=(1, 3)).reshape(-1)
        out[counts >= spec.min_patch_pixels, cls] = 1.0
    return out


def random_crop(batch: dict, rng: np.random.Generator, scale, min_visible: float = 0.5,
                ratio=(3 / 4, 4 / 3)) -> dict:
    """Random resized crops of a batch of scenes, each back to full size, with the image-level labels of what the
    crop shows: {'image', 'labels'}. A class stays in the labels when at least `min_visible` of its pixels (in the
    segmentation) are inside the crop. The demo teacher's augmentation (`pretrain.crop_scale`) so that it has seen
    partial images and objects at other scales before MaskEmbed asks it about masked ones."""
    num_classes = batch["labels"].shape[1]
    images, labels = [], []
    for img, seg in zip(batch["image"], batch["segmentation"]):
        size = img.shape[0]
        left, top, right, bottom = random_resized_crop_box(rng, size, size, scale, ratio)
        images.append(crop_resize(img, (left, top, right, bottom), size))
        total = np.bincount(seg.ravel(), minlength=num_classes + 1)[1:]
        inside = np.bincount(seg[top:bottom, left:right].ravel(), minlength=num_classes + 1)[1:]
        labels.append((total > 0) & (inside >= min_visible * total))
    return {"image": np.stack(images).astype(np.float32), "labels": np.stack(labels).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class Scenes:
    """A deterministic, indexable stream of scenes for one split."""

    spec: SceneSpec
    split: str
    seed: int = 0

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"Unknown scenes split {self.split!r}; choose from {sorted(SPLITS)}.")

    def _pool(self) -> str:
        return "test" if self.split == "probe_test" else "train"

    def examples(self, start: int, count: int) -> dict[str, np.ndarray]:
        """Scenes start..start+count-1: image (B,S,S,3), labels (B,C), patch_labels (B,N,C), segmentation (B,S,S)."""
        spec, pool = self.spec, self._pool()
        images, segs, plabels, ilabels = [], [], [], []
        for i in range(start, start + count):
            rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
            img, seg, objects = make_scene(rng, spec, pool)
            pl = patch_labels_from_objects(objects, spec)
            il = np.zeros(spec.num_classes, np.float32)
            for cls, _ in objects:
                il[cls] = 1.0
            images.append(img), segs.append(seg), plabels.append(pl), ilabels.append(il)
        return {"image": np.stack(images).astype(np.float32), "labels": np.stack(ilabels),
                "patch_labels": np.stack(plabels), "segmentation": np.stack(segs)}

    def batch(self, step: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> dict[str, np.ndarray]:
        """The batch for a training step: a pure function of (seed, split, step), so resuming is exact.

        With `shard=(i, n)` only the i-th of n contiguous slices of the global batch is built (one per host)."""
        index, count = shard
        if batch_size % count:
            raise ValueError(f"Global batch {batch_size} is not divisible by {count} hosts.")
        local = batch_size // count
        return self.examples(step * batch_size + index * local, local)


def scenes_from_config(data_cfg, split: str, seed: Optional[int] = None) -> Scenes:
    fields = {f.name for f in dataclasses.fields(SceneSpec)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_cfg.items() if k in fields}
    return Scenes(SceneSpec(**kw), split, data_cfg.get("seed", 0) if seed is None else seed)
