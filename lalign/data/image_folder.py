"""`data.name = "image_folder"`: every image under a directory (recursively), e.g. ImageNet-21k unpacked as
`ROOT/<wnid>/<image>.JPEG`.

    config.data = dict(name="image_folder", path="/mnt/disks/in21k/train", image_size=224, normalization="clip")

- Files: `.jpg .jpeg .png .webp` (any case), found by a sorted recursive walk (symlinks followed), so every host
  lists the same files in the same order. Listing millions of files takes minutes: `file_list` names a text
  file of paths relative to `path`, one per line; it is read if it exists and written after the first walk
  otherwise (`python -m lalign.data.image_folder ROOT LIST` writes one ahead of time).
- Labels: the first sub-folder of each file is its class (sorted class names -> 0..C-1); files directly in
  `path` get -1. MaskEmbed does not use labels; they are returned as `label`.
- Validation: the images under `val_path` when it is set; otherwise `num_val` images of `path` held out by a
  fixed permutation (independent of the run's seed, so validation losses stay comparable across seeds) and never
  used for training.
- Cloud storage: `path`, `val_path` and `file_list` may be `gs://` (or `s3://`) URLs, read through etils.epath and
  fsspec (`pip install gcsfs`, in `.[gcs]` and in launch/setup.sh). Each image is one object read, so keep a
  `file_list` next to the data (listing a bucket is slow) and raise `num_workers`; at ImageNet-21k scale an
  ArrayRecord data set (`data.name = "tfds"`) reads far fewer, larger objects.
- Ordering, augmentation, normalization, corrupt images, host sharding: `lalign.data.images`.
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np
from etils import epath

from lalign.data import images
from lalign.files import write_text

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
OPTIONS = dict(path="", val_path="", num_val=10_000, file_list="")
HOLDOUT_SEED = 20241015  # fixed: the held-out validation images do not depend on the run's seed
SAMPLES = 16  # images `ImageFolder.check_readable` tries before a run writes anything


def _is_url(path: str) -> bool:
    return "://" in path


def _check_dir(root: str) -> None:
    if not epath.Path(root).is_dir():
        raise FileNotFoundError(f"config.data.path: image folder {root!r} does not exist or is not a directory.")


def list_images(root: str) -> list[str]:
    """Paths (relative to `root`, '/'-separated) of every image file under `root`, sorted."""
    _check_dir(root)
    # os.walk follows symlinked class folders; epath's walk serves gs:// and other URLs.
    walk = (((str(d), n, f) for d, n, f in epath.Path(root).walk()) if _is_url(root)
            else os.walk(root, followlinks=True))
    out = []
    for dirpath, _, filenames in walk:
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        out.extend(prefix + f for f in filenames if f.lower().endswith(EXTENSIONS))
    out.sort()
    if not out:
        raise ValueError(f"No images ({'/'.join(EXTENSIONS)}) under {root!r}.")
    return out


def write_file_list(root: str, list_path: str) -> int:
    files = list_images(root)
    write_text(list_path, "\n".join(files) + "\n")  # a concurrent reader sees the whole list or none
    return len(files)


def _index(root: str, list_path: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(relative paths as a bytes array, class label per file, class names) for a folder; cached per process
    (the training and validation sources of a run share one walk), keyed by the list file's mtime."""
    stamp = None
    if list_path and epath.Path(list_path).exists():  # local: nanoseconds (a list rewritten within a second)
        stamp = epath.Path(list_path).stat().mtime if _is_url(list_path) else os.stat(list_path).st_mtime_ns
    return _cached_index(root, list_path, stamp)


@functools.lru_cache(maxsize=4)
def _cached_index(root: str, list_path: str, stamp) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    del stamp
    if list_path and epath.Path(list_path).exists():
        files = [line for line in epath.Path(list_path).read_text().splitlines() if line.strip()]
        if not files:
            raise ValueError(f"config.data.file_list {list_path!r} lists no files.")
        _check_dir(root)
    else:
        files = list_images(root)
        if list_path:
            write_file_list(root, list_path)
    tops = [f.split("/", 1)[0] if "/" in f else "" for f in files]
    classes = tuple(sorted({t for t in tops if t}))
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([lookup.get(t, -1) for t in tops], np.int32)
    paths = np.asarray([os.fsencode(f) for f in files])  # fixed-width bytes: ~1/3 of a list of str objects
    return paths, labels, classes


class ImageFolder(images.ImageSource):
    def __init__(self, data_cfg, split: str, seed: int = 0):
        opts = images.check_options(data_cfg, OPTIONS, "image_folder")
        super().__init__(opts, split, seed)
        if not opts["path"]:
            raise ValueError("config.data.path must name the image folder (e.g. --config.data.path=/data/in21k).")
        use_val_dir = not self.train and opts["val_path"]
        root = opts["val_path"] if use_val_dir else opts["path"]
        self.key = "config.data.val_path" if use_val_dir else "config.data.path"
        self.root = root.rstrip("/") if _is_url(root) else os.path.abspath(os.path.expanduser(root))
        self._paths, self.labels, self.classes = _index(self.root, "" if use_val_dir else opts["file_list"])
        n = len(self._paths)
        if opts["val_path"]:
            self.members = np.arange(n, dtype=np.int64)
        else:
            num_val = int(opts["num_val"])
            if not 0 < num_val < n:
                raise ValueError(f"config.data.num_val={num_val} must be between 1 and {n - 1}: {self.root!r} has "
                                 f"{n} images (or set config.data.val_path to a separate folder).")
            held_out = np.random.default_rng(HOLDOUT_SEED).permutation(n)
            self.members = np.sort(held_out[num_val:] if self.train else held_out[:num_val])

    def check_readable(self, samples: int = SAMPLES) -> None:
        """Refuses a split of which none of `samples` images, spread evenly over it, decodes (a folder of corrupt
        files, or of other files under an image extension): training would skip each one and stop after
        `images.MAX_ATTEMPTS` in a row, with a traceback and a workdir already begun. One that decodes is enough;
        the unreadable ones are skipped and counted as training goes."""
        n = len(self.members)
        picks = sorted({int(i) for i in np.linspace(0, n - 1, min(samples, n)).round()})
        errors = []
        for i in picks:
            example = int(self.members[i])
            try:
                data, _ = self.load(example)
                images.decode_and_crop(data, self.image_size, False, np.random.default_rng(0), self.opts)
                return
            except Exception as e:  # noqa: BLE001 - any unreadable image counts as one that failed
                errors.append((self.describe(example), e))
        example, e = errors[0]
        raise ValueError(f"{self.key}: none of the {len(errors)} images sampled from {self.root!r} (of {n} in split "
                         f"{self.split!r}) could be decoded, e.g. {example}: {type(e).__name__}: {e}. Is it the "
                         f"right folder?")

    def path(self, example_id: int) -> str:
        return f"{self.root}/{os.fsdecode(self._paths[example_id])}"

    def load(self, example_id: int) -> tuple[bytes, int]:
        return epath.Path(self.path(example_id)).read_bytes(), int(self.labels[example_id])

    def describe(self, example_id: int) -> str:
        return self.path(example_id)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m lalign.data.image_folder IMAGE_ROOT LIST_FILE   (writes the file list)")
    print(f"{write_file_list(sys.argv[1], sys.argv[2])} images listed in {sys.argv[2]}")
