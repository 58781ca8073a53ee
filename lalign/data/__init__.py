"""Data sources. Every source maps (split, step) to a batch deterministically, so resuming needs only the step.

- `scenes`: the embedded synthetic data set (no download), `lalign.data.scenes`;
- `image_folder`: a directory of images, e.g. ImageNet-21k, `lalign.data.image_folder`;
- `tfds`: a tensorflow_datasets data set in ArrayRecord files, read without TensorFlow, `lalign.data.tfds`.

The real-image sources share `lalign.data.images` (order, augmentation, corrupt images). Their batches hold
uint8 pixels, the scenes' float32 pixels already in [-1, 1]; every consumer passes a batch's images through
`lalign.data.images.device_normalize` inside its jitted function, which normalizes uint8 and passes floats.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

from lalign.data import image_folder, images, scenes, tfds


class Source(NamedTuple):
    make: Callable  # (data_cfg, split, seed) -> the source
    options: dict  # config.data's fields beside `name`, at their defaults (the tables beside each reader)


# config.data.name -> its record: a new source is one entry here
SOURCES = {
    "scenes": Source(lambda data_cfg, split, seed: scenes.scenes_from_config(data_cfg, split, seed=seed),
                     {**dataclasses.asdict(scenes.SceneSpec()), "seed": 0}),
    "image_folder": Source(lambda data_cfg, split, seed: image_folder.ImageFolder(data_cfg, split, seed=seed),
                           {**images.COMMON_OPTIONS, **image_folder.OPTIONS}),
    "tfds": Source(lambda data_cfg, split, seed: tfds.TfdsArrayRecord(data_cfg, split, seed=seed),
                   {**images.COMMON_OPTIONS, **tfds.OPTIONS}),
}


def image_source(data_cfg, split: str, seed: int = 0):
    """An object with `.batch(step, batch_size, shard=(process_index, process_count)) -> {'image': (B_local, H,
    W, 3) uint8 (real images) or float32 (scenes), ...}` for the split, a pure function of (seed, split, step)."""
    name = data_cfg.get("name") if hasattr(data_cfg, "get") else None
    if name not in SOURCES:
        raise ValueError(f"Unknown config.data.name {name!r}; available: {tuple(SOURCES)}.")
    return SOURCES[name].make(data_cfg, split, seed)


def fixed_batches(data_cfg, split: str, num_batches: int, batch_size: int, seed: int = 0,
                  shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """A fixed list of batches (validation/probe sets): batch i holds global positions i*B .. (i+1)*B-1, of which
    this host builds only its slice `shard` = (i, n), as `.batch` does."""
    source = image_source(data_cfg, split, seed=seed)
    index, count = shard
    local = batch_size // count
    if hasattr(source, "examples"):  # the same images as .batch(i, batch_size, shard), without look-ahead
        out = [source.examples(i * batch_size + index * local, local) for i in range(num_batches)]
    else:
        out = [source.batch(i, batch_size, shard) for i in range(num_batches)]
    if hasattr(source, "close"):
        source.close()
    return out
