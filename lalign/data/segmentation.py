"""Segmentation data for the patch probe: COCO-Stuff and ADE20K in their standard layouts and any "images + label
PNGs" pair of folders. Each example becomes what a ViT and the probe need:

- `image` (S, S, 3) float32: the shorter side resized to S (bilinear, antialiased when shrinking), then the centre
  S x S crop, normalized for the backbone ('siglip': [-1, 1]; 'clip': CLIP's mean/std; 'imagenet'; 'none': [0, 1]);
- `label_map` (S, S) uint8/int32: the label PNG under the *same* geometry, resized with nearest neighbour (no
  interpolated class ids);
- `patch_labels` (N, C) uint8, N = (S // p)^2 in row-major patch order (the ViT's token order), by `label_rule`:
    'union'        every class with >= `min_pixels` labeled pixels in the patch (default; the paper's rule),
    'majority'     the single most frequent labeled class of the patch (ties: the lowest class id),
    'global_union' every class of the image (the union of all patches' 'union' labels) on every patch: a control
                   that a probe can only answer with global, not local, information;
  pixels equal to `ignore_index` (COCO-Stuff: 255, unlabeled) count for no class; a patch with no labeled pixel
  gets no class. When S is not a multiple of p (SO400M/14 at 384: 27 * 14 = 378) the ViT's patch embedding
  ignores the last S mod p rows and columns, and so do the labels;
- `labels` (C,) uint8: the image-level classes (the 'global_union' row), for image-level probes.

COCO-Stuff (`coco_stuff(root, split)`), standard layout:
    ROOT/images/{train2017,val2017}/*.jpg
    ROOT/stuffthingmaps/{train2017,val2017}/*.png   (stuffthingmaps_trainval2017.zip)
A stuffthingmaps PNG holds one byte per pixel: class id 0..181 or 255 = unlabeled. Id k is line k+1 of
COCO-Stuff's labels.txt (whose id 0 is 'unlabeled'; that is where "183 classes" come from): ids 0..90 are the
91 COCO thing ids minus one (0 = person, ..., 90 = hair brush; 11 of them, `COCO_STUFF_UNUSED`, are never
annotated in COCO 2017, so 171 classes have pixels), ids 91..181 are the 91 stuff classes (91 = banner, ...,
181 = wood). The probe therefore has 182 outputs; classes without positives do not enter macro recall.

ADE20K SceneParsing (`ade20k(root, split)`), the ADEChallengeData2016 layout:
    ROOT/images/{training,validation}/*.jpg
    ROOT/annotations/{training,validation}/*.png
A PNG holds 0 ("other": no class) or k = 1..150 for class k-1 (objectInfo150's order), so the probe has 150
outputs (mmsegmentation's reduce_zero_label).

Everything is deterministic: files are paired by stem and sorted; an example is a pure function of its files and
the settings. Unreadable (corrupt/truncated) files and image/label pairs of different sizes are skipped by
`iterate`/`batches` with a warning naming the file, and counted in `dataset.skipped`. A label value that is
neither a class id nor `ignore_index`, or a multi-channel label PNG, is a configuration error: ValueError
naming the file. Reading goes through grain (threads, ordered).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from lalign.data import images

LABEL_RULES = ("union", "majority", "global_union")
# (mean, std) of [0, 1] pixels per backbone family: the training sources' table, plus 'none' ([0, 1]).
NORMALIZATIONS = {**images.NORMALIZATION, "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

ADE20K_NUM_CLASSES = 150
# ADE20K SceneParsing (objectInfo150, short names as in mmsegmentation): class k is PNG value k + 1.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

COCO_STUFF_NUM_CLASSES = 182
COCO_STUFF_IGNORE = 255
# stuffthingmaps id -> name (labels.txt id - 1).
COCO_STUFF_CLASSES = (
    # things, ids 0..90
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush",
    # stuff, ids 91..181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
# Thing ids with no annotation in COCO 2017: street sign, hat, shoe, eye glasses, plate, mirror, window, desk,
# door, blender, hair brush.
COCO_STUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
assert len(COCO_STUFF_CLASSES) == COCO_STUFF_NUM_CLASSES


class CorruptExample(Exception):
    """An example that cannot be read (skipped and counted by `iterate`)."""


# ----------------------------------------------------------------------------------------------- pure functions
def resize_crop_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left): shorter side resized to `size`, then the centre size x size crop."""
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    return new_h, new_w, (new_h - size) // 2, (new_w - size) // 2


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for a nearest-neighbour resize n_in -> n_out (pixel centres aligned)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def resize_crop_labels(label_map: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize (shorter side -> size) and centre crop of an (H, W) label map."""
    h, w = label_map.shape
    new_h, new_w, top, left = resize_crop_geometry(h, w, size)
    rows = nearest_indices(h, new_h)[top:top + size]
    cols = nearest_indices(w, new_w)[left:left + size]
    return label_map[rows[:, None], cols[None, :]]


def normalize(image_uint8: np.ndarray, normalization: str) -> np.ndarray:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Unknown normalization {normalization!r}; choose from {sorted(NORMALIZATIONS)}.")
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[normalization])
    return ((image_uint8.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def patch_class_counts(label_map: np.ndarray, patch_size: int, num_classes: int,
                       ignore_index: Optional[int] = COCO_STUFF_IGNORE) -> np.ndarray:
    """(N, C) int: labeled pixels of each class in each patch (row-major patches of the top-left
    (S // p) * p square; `ignore_index` pixels count for nothing)."""
    h, w = label_map.shape
    gh, gw = h // patch_size, w // patch_size
    if gh == 0 or gw == 0:
        raise ValueError(f"A {h}x{w} label map has no {patch_size}x{patch_size} patch.")
    region = np.asarray(label_map[:gh * patch_size, :gw * patch_size], np.int64)
    patch = (np.arange(gh * patch_size)[:, None] // patch_size) * gw + np.arange(gw * patch_size)[None] // patch_size
    valid = (region >= 0) & (region < num_classes)
    if ignore_index is not None:
        valid &= region != ignore_index
    flat = patch[valid] * num_classes + region[valid]
    return np.bincount(flat, minlength=gh * gw * num_classes).reshape(gh * gw, num_classes)


def patch_labels_from_counts(counts: np.ndarray, rule: str = "union", min_pixels: int = 1) -> np.ndarray:
    """(N, C) uint8 multi-hot patch labels from `patch_class_counts` under `rule` (see the module docstring)."""
    if rule not in LABEL_RULES:
        raise ValueError(f"Unknown label_rule {rule!r}; choose from {LABEL_RULES}.")
    union = counts >= max(int(min_pixels), 1)
    if rule == "union":
        return union.astype(np.uint8)
    if rule == "global_union":
        return np.broadcast_to(union.any(0), counts.shape).astype(np.uint8)
    out = np.zeros(counts.shape, np.uint8)
    labeled = counts.sum(1) > 0
    out[np.nonzero(labeled)[0], counts.argmax(1)[labeled]] = 1  # argmax: the lowest id among ties
    return out


def patch_labels(label_map: np.ndarray, patch_size: int, num_classes: int, rule: str = "union",
                 ignore_index: Optional[int] = COCO_STUFF_IGNORE, min_pixels: int = 1) -> np.ndarray:
    """(N, C) uint8 patch labels of a (S, S) label map; see the module docstring for the rules."""
    return patch_labels_from_counts(patch_class_counts(label_map, patch_size, num_classes, ignore_index), rule,
                                    min_pixels)


# ------------------------------------------------------------------------------------------------------ files
def list_pairs(image_dir: str, label_dir: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(stem, image_path, label_path)] sorted by stem, [images without a label PNG])."""
    for d, what in ((image_dir, "image"), (label_dir, "label")):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"No {what} directory at {d}.")
    labels = {os.path.splitext(f)[0]: f for f in os.listdir(label_dir) if f.lower().endswith(".png")}
    pairs, missing = [], []
    for f in sorted(os.listdir(image_dir)):
        stem, ext = os.path.splitext(f)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in labels:
            pairs.append((stem, os.path.join(image_dir, f), os.path.join(label_dir, labels[stem])))
        else:
            missing.append(os.path.join(image_dir, f))
    pairs.sort(key=lambda p: p[0])
    return pairs, missing


def _read_image(path: str):
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptExample(f"cannot read image {path}: {e}") from None


def _read_label(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptExample(f"cannot read label PNG {path}: {e}") from None
    if arr.ndim != 2:
        raise ValueError(f"Label PNG {path} has mode {mode} and shape {arr.shape}: a label map must hold one class "
                         f"id per pixel (mode L, P or I), not colours.")
    return arr


@dataclasses.dataclass
class SegmentationFolder:
    """Images and label PNGs paired by file stem. `ds[i]` -> {'image', 'label_map', 'patch_labels', 'labels',
    'stem'}; see the module docstring. Corrupt examples raise CorruptExample from `ds[i]` and are skipped (with a
    warning naming the file, counted in `ds.skipped`) by `iterate` and `batches`."""

    image_dir: str
    label_dir: str
    num_classes: int
    ignore_index: Optional[int] = 255
    image_size: int = 224
    patch_size: int = 16
    normalization: str = "siglip"
    label_rule: str = "union"
    min_pixels: int = 1
    class_names: Optional[Sequence[str]] = None
    name: str = ""
    # ADE20K's PNGs: 0 = "other" (no class) and k = class k-1, as mmsegmentation's reduce_zero_label
    reduce_zero_label: bool = False

    def __post_init__(self):
        if self.label_rule not in LABEL_RULES:
            raise ValueError(f"Unknown label_rule {self.label_rule!r}; choose from {LABEL_RULES}.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"Unknown normalization {self.normalization!r}; choose from {sorted(NORMALIZATIONS)}.")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than the patch size {self.patch_size}.")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes.")
        self.pairs, self.unlabeled_images = list_pairs(self.image_dir, self.label_dir)
        self.name = self.name or self.image_dir
        if self.unlabeled_images:
            warnings.warn(f"{self.name}: {len(self.unlabeled_images)} image(s) without a label PNG of the same stem "
                          f"in {self.label_dir} are left out, e.g. {self.unlabeled_images[0]}", stacklevel=3)
        if not self.pairs:
            raise ValueError(f"No image/label pairs in {self.image_dir} and {self.label_dir} (images: "
                             f"{'/'.join(IMAGE_EXTENSIONS)}; labels: .png with the same stem).")
        self.skipped: dict[str, str] = {}  # file -> reason, of corrupt examples met by iterate() (as image sources)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        stem, image_path, label_path = self.pairs[index]
        image = _read_image(image_path)
        labels = _read_label(label_path)
        if self.reduce_zero_label:
            labels = labels.astype(np.int32)
            keep = labels != self.ignore_index
            labels = np.where(labels == 0, self.ignore_index, np.where(keep, labels - 1, labels))
        if labels.shape != (image.height, image.width):
            raise CorruptExample(f"label PNG {label_path} is {labels.shape[1]}x{labels.shape[0]} but its image "
                                 f"{image_path} is {image.width}x{image.height}")
        bad = labels >= self.num_classes
        if self.ignore_index is not None:
            bad &= labels != self.ignore_index
        if bad.any() or (labels < 0).any():
            values = np.unique(labels[bad | (labels < 0)])[:8].tolist()
            raise ValueError(f"Label PNG {label_path} holds values {values} that are neither class ids "
                             f"0..{self.num_classes - 1} nor the ignore_index {self.ignore_index}.")
        s = self.image_size
        new_h, new_w, top, left = resize_crop_geometry(image.height, image.width, s)
        resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized, np.uint8)[top:top + s, left:left + s]
        label_map = resize_crop_labels(labels, s)
        counts = patch_class_counts(label_map, self.patch_size, self.num_classes, self.ignore_index)
        patch = patch_labels_from_counts(counts, self.label_rule, self.min_pixels)
        image_labels = patch_labels_from_counts(counts, "union", self.min_pixels).any(0).astype(np.uint8)
        return {"image": normalize(pixels, self.normalization), "label_map": label_map, "patch_labels": patch,
                "labels": image_labels, "stem": stem}

    def _safe(self, index: int) -> dict:
        try:
            return {"index": index, **self[index]}
        except CorruptExample as e:
            return {"index": index, "error": str(e), "file": self.pairs[index][1]}

    def iterate(self, indices: Optional[Iterable[int]] = None, num_threads: int = 8) -> Iterator[dict]:
        """Examples in the order of `indices` (default: all), read by `num_threads` threads; corrupt ones are
        skipped with a warning naming the file and recorded in `self.skipped`."""
        import grain  # lazy: seconds to import, only when a set is read

        indices = list(range(len(self)) if indices is None else indices)
        ds = grain.MapDataset.source(indices).map(self._safe)
        if num_threads > 1:
            records = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                                prefetch_buffer_size=4 * num_threads)))
        else:
            records = iter(ds)
        for rec in records:
            if "error" in rec:
                self.skipped[rec["file"]] = rec["error"]
                warnings.warn(f"{self.name}: skipping example {rec['index']} ({rec['file']}): {rec['error']}",
                              stacklevel=2)
                continue
            yield rec

    def batches(self, batch_size: int, indices: Optional[Iterable[int]] = None, num_threads: int = 8,
                keys: Sequence[str] = ("image", "patch_labels", "labels")) -> Iterator[dict]:
        """Stacked batches of `keys` (the last one may be smaller), corrupt examples skipped as in `iterate`."""
        buf = []
        for rec in self.iterate(indices, num_threads):
            buf.append(rec)
            if len(buf) == batch_size:
                yield _stack(buf, keys)
                buf = []
        if buf:
            yield _stack(buf, keys)


def _stack(records: list[dict], keys: Sequence[str]) -> dict:
    out = {k: np.stack([r[k] for r in records]) for k in keys}
    out["index"] = np.asarray([r["index"] for r in records])
    return out


def coco_stuff(root: str, split: str, **kw) -> SegmentationFolder:
    """COCO-Stuff `split` ('train2017' or 'val2017') under ROOT/images and ROOT/stuffthingmaps (module docstring).
    `kw`: image_size, patch_size, normalization, label_rule, min_pixels."""
    if split not in ("train2017", "val2017"):
        raise ValueError(f"COCO-Stuff split must be 'train2017' or 'val2017', got {split!r}.")
    return SegmentationFolder(os.path.join(root, "images", split), os.path.join(root, "stuffthingmaps", split),
                              num_classes=COCO_STUFF_NUM_CLASSES, ignore_index=COCO_STUFF_IGNORE,
                              class_names=COCO_STUFF_CLASSES, name=f"coco_stuff/{split}", **kw)


def ade20k(root: str, split: str, **kw) -> SegmentationFolder:
    """ADE20K SceneParsing `split` ('training' or 'validation') of ADEChallengeData2016 at ROOT (module docstring):
    150 classes, label 0 ("other") counts for no class."""
    if split not in ("training", "validation"):
        raise ValueError(f"ADE20K split must be 'training' or 'validation', got {split!r}.")
    return SegmentationFolder(os.path.join(root, "images", split), os.path.join(root, "annotations", split),
                              num_classes=ADE20K_NUM_CLASSES, ignore_index=255, class_names=ADE20K_CLASSES,
                              name=f"ade20k/{split}", reduce_zero_label=True, **kw)


def carve_validation(num_examples: int, num_val: int, seed: int = 0,
                     num_train: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, val_indices), both sorted: a seeded random subset of `num_val` examples becomes the
    validation split and the rest (or a seeded random `num_train` of the rest, -1 = all) the training split."""
    if not 0 < num_val < num_examples:
        raise ValueError(f"Cannot carve {num_val} validation examples out of {num_examples}.")
    order = np.random.default_rng(seed).permutation(num_examples)
    val, train = order[:num_val], order[num_val:]
    if 0 <= num_train < len(train):
        train = train[:num_train]
    return np.sort(train), np.sort(val)
