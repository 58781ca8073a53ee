"""Shared machinery of the real-image sources (`image_folder`, `tfds`): ordering, decoding, augmentation,
corrupt-image handling, host sharding and a look-ahead of several steps (grain). Batches are uint8 pixels; the
run's normalization (`normalization`: siglip's [-1, 1], CLIP's or ImageNet's mean/std) is applied on the device,
inside each jitted function that takes the images (`device_normalize`).

The contract is the one every lalign source keeps: `batch(step, batch_size, shard=(i, n))` is a pure function of
(seed, split, step), and builds only host i's contiguous slice of the global batch. Resuming therefore needs the
step and nothing else (no iterator state in the checkpoint).

How a global example index g = step * batch_size + row becomes an image:
- epoch e = g // n, position g % n in a permutation of the split's n examples drawn from (seed, split, e);
  the validation split is permuted too (so a few fixed batches are a random sample, not the first classes);
- the augmentation of row g draws from `np.random.default_rng([seed, split, g, attempt])`; training splits get
  `train_crop_mode` + horizontal flip:
    'rkrc' (default, the reference's: timm's ResizeKeepRatio + CenterCropOrPad): the shorter side resized to the
      output size, then with probability 0.5 zoomed in by 1/sqrt(u), u ~ U(crop_scale) (an area scale like RRC's),
      and with probability 0.5 its aspect changed by a log-uniform factor in `crop_ratio`; the centre is cropped,
      and a side that came out short is padded by reflection;
    'rrc': random-resized-crop (area fraction `crop_scale`, aspect ratio `crop_ratio`, log-uniform,
      torchvision's 10-try rule with a centre crop fallback);
  validation splits a centre square crop (`val_crop_fraction` of the short side). Training splits resize with
  `train_interpolation`: 'random' (default, the reference's `--train-interpolation random`: bilinear or bicubic
  with probability 1/2, drawn per row after the crop, as timm draws it), 'bicubic', 'bilinear', or '' (=
  `interpolation`); validation splits with `interpolation`: 'bicubic' (default; timm's CLIP / SigLIP pretrained
  configs) or 'bilinear'. Both are PIL's antialiased filters, straight from the source pixels of the region the
  output needs;
- JPEGs are decoded at a reduced DCT scale (`draft`) when the crop is at least twice the output size, which is
  most of the decoding time on large images and does not change what the crop shows;
- an image that cannot be read or decoded is *skipped*: it is replaced by another example of the split drawn
  from the same per-row generator (attempt 1, 2, ...), so the batch stays a pure function of the step. Each bad
  example is counted once (`num_skipped`, `skipped`) and a `CorruptImageWarning` names it. Only if
  `MAX_ATTEMPTS` draws in a row fail (a folder of unreadable files, a wrong mount) does the source raise.

How the rows are built: by grain. `dataset(batch_size, shard)` is a `grain.MapDataset` whose element `step` is
this host's batch of that step (`row` for each of its positions, then `_collate`), so host i decodes only its
rows. `batch` reads it through a grain iterator started at the step asked for: `prefetch` steps ahead, decoded by
`num_workers` worker processes (`mp_prefetch`; each builds whole batches), or with `num_workers` 0 by this
process's threads (PIL releases the GIL while it decodes and resizes). The iterator's position is never
checkpointed: asking for another step than the next starts a new one there, which is all a resume does. Reads
and skipped images are reported with each batch and counted in the training process.
"""
from __future__ import annotations

import io
import math
import os
import threading
import warnings
import zlib
from typing import Sequence

import numpy as np
from absl import flags
from PIL import Image

NORMALIZATION = {  # name -> (mean, std) of [0, 1] pixels
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # -> [-1, 1]
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
TRAIN_SPLITS = ("maskembed", "train", "pretrain", "probe_train")
EVAL_SPLITS = ("maskembed_val", "val", "validation", "test", "probe_val", "probe_test")
MAX_ATTEMPTS = 16
TRAIN_CROP_MODES = ("rkrc", "rrc")
INTERPOLATIONS = {"bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling values
RANDOM_INTERPOLATIONS = ("bilinear", "bicubic")  # timm's _RANDOM_INTERPOLATION, in its order
TRAIN_INTERPOLATIONS = ("random", *INTERPOLATIONS, "")

# Options every real-image source takes (config.data.<name>), with defaults.
COMMON_OPTIONS = dict(
    image_size=224,
    normalization="siglip",  # siglip | clip | imagenet
    train_crop_mode="rkrc",  # rkrc (the reference's, timm's ResizeKeepRatio + CenterCropOrPad) | rrc
    # Validation (and training if train_interpolation is ""): bicubic (timm's CLIP/SigLIP configs) | bilinear.
    interpolation="bicubic",
    # Training: random (the reference's --train-interpolation default: bilinear or bicubic per image, as timm) |
    # bicubic | bilinear | "" (= interpolation, as the reference with an empty --train-interpolation).
    train_interpolation="random",
    crop_scale=(0.08, 1.0),  # rkrc: zoom-in area range; rrc: fraction of the image area
    crop_ratio=(3 / 4, 4 / 3),  # rkrc: aspect change range; rrc: aspect ratio w/h
    flip=True,  # random horizontal flip (training splits)
    val_crop_fraction=1.0,  # validation: centre square of this fraction of the short side
    num_workers=0,  # grain worker processes decoding the look-ahead; 0 = threads of this process (min(32, CPUs))
    prefetch=4,  # steps decoded ahead of the one training (0 = none: each batch is decoded when asked for)
    seed=None,  # overrides the run's seed for the data order and augmentation
    patch_size=None,  # ignored here (used by the scenes' patch labels); accepted so configs can share fields
)


class CorruptImageWarning(UserWarning):
    """An image could not be read or decoded and was replaced by another one."""


def is_train_split(split: str) -> bool:
    if split in TRAIN_SPLITS:
        return True
    if split in EVAL_SPLITS:
        return False
    raise ValueError(f"Unknown split {split!r}; training splits: {TRAIN_SPLITS}, evaluation splits: {EVAL_SPLITS}.")


def check_options(data_cfg, extra: dict, source: str) -> dict:
    """config.data as a plain dict with defaults filled in; unknown fields (typos) are a clear error."""
    allowed = {"name", *COMMON_OPTIONS, *extra}
    given = dict(data_cfg.items()) if hasattr(data_cfg, "items") else dict(data_cfg)
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"config.data: unknown field(s) {unknown} for data.name={source!r}; "
                         f"valid fields: {sorted(allowed)}.")
    opts = {**COMMON_OPTIONS, **extra, **given}
    if opts["normalization"] not in NORMALIZATION:
        raise ValueError(f"config.data.normalization {opts['normalization']!r} is unknown; choose from "
                         f"{sorted(NORMALIZATION)}.")
    lo, hi = opts["crop_scale"]
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"config.data.crop_scale must satisfy 0 < min <= max <= 1, got {tuple(opts['crop_scale'])}.")
    rlo, rhi = opts["crop_ratio"]
    if not 0 < rlo <= rhi:
        raise ValueError(f"config.data.crop_ratio must satisfy 0 < min <= max, got {tuple(opts['crop_ratio'])}.")
    if opts["train_crop_mode"] not in TRAIN_CROP_MODES:
        raise ValueError(f"config.data.train_crop_mode must be one of {TRAIN_CROP_MODES}, got "
                         f"{opts['train_crop_mode']!r}.")
    if opts["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"config.data.interpolation must be one of {sorted(INTERPOLATIONS)}, got "
                         f"{opts['interpolation']!r}.")
    if opts["train_interpolation"] not in TRAIN_INTERPOLATIONS:
        raise ValueError(f"config.data.train_interpolation must be one of {TRAIN_INTERPOLATIONS} ('' = "
                         f"config.data.interpolation), got {opts['train_interpolation']!r}.")
    if not 0 < opts["val_crop_fraction"] <= 1:
        raise ValueError(f"config.data.val_crop_fraction must be in (0, 1], got {opts['val_crop_fraction']}.")
    return opts


def normalize(images_uint8: np.ndarray, normalization: str) -> np.ndarray:
    """On the host (numpy): uint8 pixels -> normalized float32. The training sources leave this to the device
    (`device_normalize`); this is for the few images an export or a tool feeds a model directly."""
    return _normalized(images_uint8, normalization)


def _normalized(images, normalization: str):
    """The one formula, for numpy arrays on the host and jax arrays inside a jitted function alike."""
    mean, std = NORMALIZATION[normalization]
    x = images.astype(np.float32) * np.float32(1 / 255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def device_normalize(images, normalization: str):
    """On the device, inside the jitted function that consumes the batch (one elementwise pass XLA fuses with
    whatever it can): uint8 pixels (B, H, W, 3) -> float32 normalized with `normalization` (a NORMALIZATION
    name), the formula of `normalize`. Float images (the embedded scenes, already in [-1, 1]; the segmentation sets,
    normalized where they are read) pass through unchanged, so every consumer calls this on every batch.
    Why on the device: the host's float32 normalize was more than half of its work per image, and uint8 moves a
    quarter of the bytes to the device."""
    if images.dtype != np.uint8:
        return images
    if normalization not in NORMALIZATION:
        raise ValueError(f"uint8 images need a normalization, one of {sorted(NORMALIZATION)}; got {normalization!r}.")
    return _normalized(images, normalization)


def run_normalization(data_cfg) -> str:
    """The NORMALIZATION name the device applies to a run's uint8 batches: `config.data.normalization`, or the
    real-image sources' default where it is not set (the scenes' float batches ignore it)."""
    name = data_cfg.get("normalization") if hasattr(data_cfg, "get") else None
    return name or COMMON_OPTIONS["normalization"]


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int, scale: Sequence[float],
                            ratio: Sequence[float]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a crop covering `scale` of the area with aspect ratio in `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * r)))
        h = int(round(math.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    # Fallback: the largest centre crop whose ratio is within bounds.
    r = width / height
    if r < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif r > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def resize_keep_ratio_size(width: int, height: int, size: int, zoom_area=None, log_aspect=None) -> tuple[int, int]:
    """(width, height) timm's ResizeKeepRatio (longest=0, random_scale_area=True) resizes an image to, given its
    draws: `zoom_area` u in crop_scale (None: no zoom), `log_aspect` in log(crop_ratio) (None: no aspect change).
    The shorter side becomes `size`, times 1/sqrt(u); the aspect factor a = exp(log_aspect) widens by sqrt(a) and
    shortens by sqrt(a)."""
    ratio = min(height / size, width / size)
    f = 1.0 / math.sqrt(zoom_area) if zoom_area is not None else 1.0
    fh, fw = f, f
    if log_aspect is not None:
        a = math.sqrt(math.exp(log_aspect))
        fh, fw = fh / a, fw * a
    return round(width * fw / ratio), round(height * fh / ratio)  # Python's round, as timm


def draw_resize_keep_ratio(rng: np.random.Generator, width: int, height: int, size: int, scale: Sequence[float],
                           ratio: Sequence[float]) -> tuple[int, int]:
    """`resize_keep_ratio_size` with timm's draws: each of zoom and aspect change with probability 0.5."""
    zoom = rng.uniform(scale[0], scale[1]) if rng.random() < 0.5 else None
    aspect = rng.uniform(math.log(ratio[0]), math.log(ratio[1])) if rng.random() < 0.5 else None
    return resize_keep_ratio_size(width, height, size, zoom, aspect)


def center_crop_or_pad_plan(width: int, height: int, size: int) -> tuple[tuple[int, int, int, int], int, int]:
    """timm's center_crop_or_pad for a (width, height) image and a size x size output: ((left, top, right, bottom)
    reflect padding, crop left, crop top), the crop in padded coordinates."""
    pad = ((size - width) // 2 if size > width else 0, (size - height) // 2 if size > height else 0,
           (size - width + 1) // 2 if size > width else 0, (size - height + 1) // 2 if size > height else 0)
    w, h = width + pad[0] + pad[2], height + pad[1] + pad[3]
    return pad, int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


def center_crop_box(width: int, height: int, fraction: float) -> tuple[float, float, float, float]:
    side = min(width, height) * fraction
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def train_resample(rng: np.random.Generator, opts: dict) -> int:
    """The PIL filter of one training image: `train_interpolation`, or for 'random' one of
    RANDOM_INTERPOLATIONS drawn from the row's generator with probability 1/2 each (timm's random.choice)."""
    name = opts.get("train_interpolation", COMMON_OPTIONS["train_interpolation"]) or opts.get("interpolation",
                                                                                              "bicubic")
    if name == "random":
        name = RANDOM_INTERPOLATIONS[int(rng.integers(len(RANDOM_INTERPOLATIONS)))]
    return INTERPOLATIONS[name]


def decode_and_crop(data: bytes, size: int, train: bool, rng: np.random.Generator, opts: dict) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8, cropped and resized (and flipped) as described above."""
    resample = INTERPOLATIONS[opts.get("interpolation", "bicubic")]
    pad = None
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if train and opts.get("train_crop_mode", "rkrc") == "rkrc":
            out_w, out_h = draw_resize_keep_ratio(rng, width, height, size, opts["crop_scale"], opts["crop_ratio"])
            pad, left, top = center_crop_or_pad_plan(out_w, out_h, size)
            # The part of the resized image the output shows: a padded axis whole, the other the crop. Resizing
            # only that box gives the pixels of resizing the whole image and cropping.
            x0, x1 = (0, out_w) if pad[0] + pad[2] else (left, left + size)
            y0, y1 = (0, out_h) if pad[1] + pad[3] else (top, top + size)
            sx, sy = width / out_w, height / out_h
            box, out_size = (x0 * sx, y0 * sy, x1 * sx, y1 * sy), (x1 - x0, y1 - y0)
        elif train:
            box = random_resized_crop_box(rng, width, height, opts["crop_scale"], opts["crop_ratio"])
            out_size = (size, size)
        else:
            box = center_crop_box(width, height, opts["val_crop_fraction"])
            out_size = (size, size)
        if train:  # drawn after the crop and before the flip, timm's order; no draw unless 'random'
            resample = train_resample(rng, opts)
        flip = train and bool(opts["flip"]) and rng.random() < 0.5
        shrink = max(out_size) / max(1.0, min(box[2] - box[0], box[3] - box[1]))
        if img.format == "JPEG" and shrink <= 0.5:  # decode at 1/2, 1/4 or 1/8 scale, never below the output
            img.draft("RGB", (math.ceil(width * shrink), math.ceil(height * shrink)))
        rgb = to_rgb(img)  # decodes (errors on corrupt data surface here)
    sx, sy = rgb.size[0] / width, rgb.size[1] / height
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    out = np.asarray(rgb.resize(out_size, resample, box=box))
    if pad is not None and any(pad):
        out = np.pad(out, ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), mode="reflect")
    return out[:, ::-1] if flip else out


def to_rgb(img):
    """A PIL image as 8-bit RGB. 16- and 32-bit greyscale (PNG 'I;16', 'I') are scaled from their full range:
    PIL's own convert clips them at 255, which turns almost every 16-bit pixel white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max() <= 65535 else float(2 ** 32 - 1)
        grey = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")


def split_code(split: str) -> int:
    return zlib.crc32(split.encode())


class ImageSource:
    """Base of the real-image sources: subclasses set `members` (example ids of the split) and implement
    `load(example_id) -> (encoded image bytes, label or -1)` and `describe(example_id) -> str`. A source pickles
    without its feed and its counts, so grain's worker processes get a copy that reads and decodes."""

    members: np.ndarray

    def __init__(self, opts: dict, split: str, seed: int):
        self.opts, self.split = opts, split
        self.train = is_train_split(split)
        self.seed = int(opts["seed"]) if opts.get("seed") is not None else int(seed)
        self.image_size = int(opts["image_size"])
        self._code = split_code(split)
        self.processes = max(0, int(opts.get("num_workers") or 0))  # grain's worker processes; 0: threads only
        self.threads = min(32, os.cpu_count() or 1)  # decoding threads of a process without worker processes
        self.num_workers = self.processes or self.threads  # parallel decoders of the look-ahead
        self.prefetch = max(0, int(opts.get("prefetch") or 0))  # steps read ahead of the one asked for
        self._local_state()

    def _local_state(self) -> None:
        self._lock = threading.Lock()
        self._perms: dict[int, np.ndarray] = {}
        self._skipped: dict[int, str] = {}  # example id -> reason
        self.num_read = 0  # files/records read (prefetched ones included): each host reads only its own rows
        self._feed = None  # (key, next step, grain iterator) of the running look-ahead

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_lock", "_perms", "_skipped", "num_read", "_feed")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local_state()

    # ------------------------------------------------------------------------------------------- subclasses
    def load(self, example_id: int) -> tuple[bytes, int]:
        raise NotImplementedError

    def describe(self, example_id: int) -> str:
        return f"example {example_id}"

    # ------------------------------------------------------------------------------------------------ public
    def __len__(self) -> int:
        return len(self.members)

    @property
    def num_skipped(self) -> int:
        """How many distinct examples were unreadable so far (each replaced by another one)."""
        with self._lock:
            return len(self._skipped)

    @property
    def skipped(self) -> dict[str, str]:
        """{file or record: error} of the unreadable examples met so far."""
        with self._lock:
            return {self.describe(i): why for i, why in self._skipped.items()}

    def example_id(self, g: int) -> int:
        """The example at global position g of the stream (epoch g // n, shuffled per epoch)."""
        n = len(self.members)
        return int(self.members[self._permutation(g // n)[g % n]])

    def dataset(self, batch_size: int, shard: tuple[int, int] = (0, 1)):
        """This host's batches as a `grain.MapDataset`: element `step` is `batch(step, batch_size, shard)` (rows
        g = step * batch_size + shard[0] * local + r, r < local, each one `row` of the split's stream)."""
        local = self._local(batch_size, shard)
        rows = _grain().MapDataset.range(0, _MAX_POSITION // batch_size * local)
        return rows.map(_HostRow(self, batch_size, local, shard[0] * local)).batch(local, batch_fn=self._collate)

    def batch(self, step: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> dict[str, np.ndarray]:
        """Host `shard[0]`'s contiguous slice of global batch `step`: {'image': (B_local, S, S, 3) uint8,
        'label': (B_local,) int32 (-1 where unknown), 'index': (B_local,) global positions}. With `prefetch`,
        the steps after it are read ahead by grain while the caller trains on this one; asking for any other step
        than the next starts a new look-ahead there (a resume needs only the step)."""
        local = self._local(batch_size, shard)
        if not self.prefetch:
            return self.examples(step * batch_size + shard[0] * local, local)
        key = (batch_size, tuple(shard))
        if self._feed is None or self._feed[:2] != (key, step):
            self.close()
            self._feed = (key, step, iter(self._pipeline(batch_size, shard, step)))
        try:
            out = next(self._feed[2])
        except BaseException:  # a failed iterator is not asked again: the next call starts afresh
            self.close()
            raise
        self._feed = (key, step + 1, self._feed[2])
        return self._account(out)

    def examples(self, start: int, count: int) -> dict[str, np.ndarray]:
        """Global positions start..start+count-1 (same images as the batches that cover them), decoded now by
        grain's threads in this process."""
        grain = _grain()
        rows = grain.MapDataset.range(start, start + count).map(self.row)
        it = rows.to_iter_dataset(grain.ReadOptions(num_threads=min(self.threads, max(count, 1)),
                                                    prefetch_buffer_size=max(count, 1)))
        return self._account(self._collate(list(it)))

    def close(self) -> None:
        """Stops the look-ahead (its threads or worker processes)."""
        feed, self._feed = self._feed, None
        if feed is not None and hasattr(feed[2], "close"):
            feed[2].close()

    # ------------------------------------------------------------------------------------------- internals
    @staticmethod
    def _local(batch_size: int, shard: tuple[int, int]) -> int:
        if batch_size % shard[1]:
            raise ValueError(f"Global batch {batch_size} is not divisible by {shard[1]} hosts.")
        return batch_size // shard[1]

    def _pipeline(self, batch_size: int, shard: tuple[int, int], step: int):
        """The look-ahead from `step` on: without worker processes, this process's threads decode the rows of the
        next `prefetch` steps; with them, each worker builds whole batches (grain slices the batches among
        workers) with threads enough for the `prefetch` steps in flight."""
        grain = _grain()
        local = self._local(batch_size, shard)
        if not self.processes:
            rows = grain.MapDataset.range(0, _MAX_POSITION // batch_size * local).map(
                _HostRow(self, batch_size, local, step * batch_size + shard[0] * local))
            read = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch * local)
            return rows.to_iter_dataset(read).batch(local, batch_fn=self._collate)
        per_worker = -(-self.prefetch // self.processes)
        read = grain.ReadOptions(num_threads=per_worker, prefetch_buffer_size=per_worker)
        _absl_flags_readable()
        return self.dataset(batch_size, shard)[step:].to_iter_dataset(read).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=self.processes, per_worker_buffer_size=per_worker))

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                rng = np.random.default_rng([self.seed, self._code, epoch])
                perm = rng.permutation(len(self.members)).astype(np.int64)
                if len(self._perms) >= 4:  # look-ahead threads span a few epochs at most
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def _collate(self, rows) -> dict:
        images = np.stack([r[0] for r in rows]) if rows else np.zeros((0, self.image_size, self.image_size, 3),
                                                                     np.uint8)
        return {"image": images,  # uint8: normalized on the device (`device_normalize`)
                "label": np.asarray([r[1] for r in rows], np.int32),
                "index": np.asarray([r[2] for r in rows], np.int64),
                # where the rows were built (maybe a worker process): the reads and skips, counted on return
                "reads": np.asarray([r[3] for r in rows], np.int64),
                "skipped": tuple(s for r in rows for s in r[4])}

    def _account(self, batch: dict) -> dict[str, np.ndarray]:
        """Counts a built batch's reads and unreadable examples here, where `num_read` and `skipped` live."""
        batch = dict(batch)
        reads, skipped = int(np.sum(batch.pop("reads"))), batch.pop("skipped")
        with self._lock:
            self.num_read += reads
        for example, why in skipped:
            self._note_skipped(int(example), why)
        return batch

    def row(self, g: int) -> tuple:
        """Row g of the split's stream: (image, label, g, files read, ((example, error), ...) skipped), a pure
        function of (seed, split, g): an unreadable example is replaced by another drawn from the row's own
        generator (attempt 1, 2, ...)."""
        example = self.example_id(g)
        errors = []
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng([self.seed, self._code, g, attempt])
            if attempt:  # the previous draw was unreadable: another example of the split, same generator
                example = int(self.members[rng.integers(len(self.members))])
            try:
                data, label = self.load(example)
                image = decode_and_crop(data, self.image_size, self.train, rng, self.opts)
            except Exception as e:  # noqa: BLE001 - any unreadable image is skipped, never fatal
                errors.append((example, f"{type(e).__name__}: {e}"))
                continue
            return image, int(label), g, attempt + 1, tuple(errors)
        for example, why in errors:
            self._note_skipped(example, why)
        raise RuntimeError(f"{MAX_ATTEMPTS} images in a row could not be read for position {g} of split "
                           f"{self.split!r}; is the data path right? Errors: " +
                           "; ".join(f"{self.describe(e)}: {why}" for e, why in errors[:4]))

    def _note_skipped(self, example: int, why: str) -> None:
        with self._lock:
            new = example not in self._skipped
            self._skipped.setdefault(example, why)
            total = len(self._skipped)
        if new:
            warnings.warn(f"Skipping unreadable image {self.describe(example)} ({why}); replaced by another "
                          f"image of split {self.split!r} ({total} skipped so far).", CorruptImageWarning,
                          stacklevel=2)


class _HostRow:
    """Row k of a host's rows -> `source.row` of global position offset + (k // local) * batch_size + k % local
    (a class, not a lambda: grain pickles it into its worker processes)."""

    def __init__(self, source: ImageSource, batch_size: int, local: int, offset: int):
        self.source, self.batch_size, self.local, self.offset = source, batch_size, local, offset

    def __call__(self, k: int) -> tuple:
        return self.source.row(self.offset + k // self.local * self.batch_size + k % self.local)


_MAX_POSITION = 1 << 62  # global positions a grain dataset spans: unbounded in practice


def _grain():
    import grain  # lazy: seconds to import, and only the real-image sources read through it

    return grain


def _absl_flags_readable() -> None:
    """grain's worker processes read its absl flags; outside an absl app (a library call, a test) nothing has
    parsed them, and reading one raises. Their defaults are then what is meant."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
