"""The probe's train / val / test splits of each data set: the embedded scenes, COCO-Stuff, ADE20K and any folder
of images + label PNGs, with a validation split carved out of the training images where a data set has none."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, NamedTuple

import ml_collections
import numpy as np

from lalign.data import SOURCES, image_source, segmentation as seg


@dataclasses.dataclass
class ProbeSplit:
    """One probe split: at most `size` examples, produced as batches {'image', 'patch_labels', 'labels'}."""

    name: str
    source: str
    size: int
    batches: Callable[[int], Iterator[dict]]
    num_classes: int
    dataset: object = None  # a SegmentationFolder (for its skipped files)


def array_split(name: str, source: str, arrays: dict) -> ProbeSplit:
    def batches(bs):
        for i in range(0, len(arrays["image"]), bs):
            yield {k: arrays[k][i:i + bs] for k in ("image", "patch_labels", "labels")}

    return ProbeSplit(name, source, len(arrays["image"]), batches, arrays["patch_labels"].shape[-1])


def folder_split(name: str, dataset, indices, num_threads: int, note: str = "") -> ProbeSplit:
    indices = [int(i) for i in indices]
    return ProbeSplit(name, f"{dataset.name} ({len(indices)} of {len(dataset)}{note})", len(indices),
                      lambda bs: dataset.batches(bs, indices, num_threads), dataset.num_classes, dataset)


def _scenes(config, image_size: int, patch_size: int, normalization: str, seed) -> tuple[dict, list]:
    """The embedded scenes' splits (probe_train / probe_val / probe_test of config.probe's sizes)."""
    d, p = data_options(config.data), config.probe
    sizes = {"train": ("probe_train", p.num_train), "val": ("probe_val", p.num_val),
             "test": ("probe_test", p.num_test)}
    seed = d.seed if seed is None else seed
    splits = {}
    for name, (split, n) in sizes.items():
        source = image_source(d, split, seed=seed)
        if source.spec.image_size != image_size or source.spec.patch_size != patch_size:
            raise ValueError(f"Scenes of {source.spec.image_size}px with {source.spec.patch_size}px patches do "
                             f"not fit this backbone ({image_size}px, {patch_size}px patches).")
        splits[name] = array_split(name, f"scenes/{split} seed {seed} ({n})", source.examples(0, n))
    nc = splits["train"].num_classes
    names = [str(c) for c in range(10)] if nc == 10 else [f"{c % 10}/colour{c // 10}" for c in range(nc)]
    return splits, names


# ------------------------------------------------------------------------------------------ folder data sets
# Each reads (config.data, SegmentationFolder keywords) -> (train, val or None, test) data sets; val None: carved out
# of train.
def _coco_stuff(d, kw: dict) -> tuple:
    if not d.root:
        raise ValueError("config.data.root must name the COCO-Stuff directory (images/, stuffthingmaps/).")
    return seg.coco_stuff(d.root, "train2017", **kw), None, seg.coco_stuff(d.root, "val2017", **kw)


def _ade20k(d, kw: dict) -> tuple:
    if not d.root:
        raise ValueError("config.data.root must name the ADEChallengeData2016 directory (images/, annotations/).")
    return seg.ade20k(d.root, "training", **kw), None, seg.ade20k(d.root, "validation", **kw)


def _folder(d, kw: dict) -> tuple:
    def folder(split):
        images, labels = d[f"{split}_images"], d[f"{split}_labels"]
        if not images:
            return None
        names = list(d.class_names) if d.class_names else None
        return seg.SegmentationFolder(images, labels, num_classes=d.num_classes, ignore_index=d.ignore_index,
                                      class_names=names, name=f"folder/{split}", **kw)

    train_ds, val_ds, test_ds = folder("train"), folder("val"), folder("test")
    if train_ds is None or test_ds is None:
        raise ValueError("data.name='folder' needs data.train_images/train_labels and data.test_images/"
                         "test_labels (data.val_images/val_labels optional: else carved out of train).")
    return train_ds, val_ds, test_ds


# The options every folder data set takes (config.data of a `lalign.probe` config), at their defaults.
FOLDER_OPTIONS = dict(
    image_size=0,  # 0 = the backbone's (its position grid x patch size)
    normalization="",  # siglip | clip | imagenet | none; "" = the backbone's
    label_rule="union",  # union | majority | global_union (lalign.data.segmentation)
    min_pixels=1,  # union: a class is in a patch when it covers at least this many of its pixels
    num_train=-1,  # -1 = all (less the carved-out validation images)
    num_val=1000,  # carved out of train where the data set has no validation split (seeded by split_seed)
    num_test=-1,  # -1 = all
    split_seed=0,
    num_threads=16,  # image decoding threads
)


def _folder_splits(read: Callable, config, image_size: int, patch_size: int, normalization: str,
                   seed) -> tuple[dict, list]:
    """The splits of the folder data set `read` reads, with a validation split carved out of train where it has
    none."""
    d = data_options(config.data)
    kw = dict(image_size=image_size, patch_size=patch_size, normalization=normalization,
              label_rule=d.label_rule, min_pixels=d.min_pixels)
    threads = d.num_threads
    train_ds, val_ds, test_ds = read(d, kw)
    num_train, num_test = d.num_train, d.num_test
    note = ""
    if val_ds is None:  # carve a validation split out of train; the data set's own val split is the test split
        train_idx, val_idx = seg.carve_validation(len(train_ds), d.num_val, d.split_seed, num_train)
        val_ds, note = train_ds, f", carved out with split_seed {d.split_seed}"
    else:
        train_idx, val_idx = np.arange(len(train_ds)), np.arange(len(val_ds))
        if 0 <= num_train < len(train_idx):
            train_idx = np.sort(np.random.default_rng(d.split_seed).permutation(len(train_ds))[:num_train])
    test_idx = np.arange(len(test_ds) if num_test < 0 else min(num_test, len(test_ds)))
    splits = {"train": folder_split("train", train_ds, train_idx, threads),
              "val": folder_split("val", val_ds, val_idx, threads, note),
              "test": folder_split("test", test_ds, test_idx, threads)}
    names = list(train_ds.class_names) if train_ds.class_names else [str(c) for c in range(train_ds.num_classes)]
    return splits, names


class DataSet(NamedTuple):
    splits: Callable  # (config, image_size, patch_size, normalization, seed) -> (splits, class names)
    options: dict  # config.data's fields beside `name`, at their defaults


# config.data.name -> its record: a new data set is one entry here
DATASETS = {
    "coco_stuff": DataSet(functools.partial(_folder_splits, _coco_stuff),
                          {**FOLDER_OPTIONS, "root": "", "num_val": 5000}),
    "ade20k": DataSet(functools.partial(_folder_splits, _ade20k), {**FOLDER_OPTIONS, "root": "", "num_val": 2000}),
    "folder": DataSet(functools.partial(_folder_splits, _folder),
                      {**FOLDER_OPTIONS, **{f"{s}_{k}": "" for s in ("train", "val", "test")
                                            for k in ("images", "labels")},
                       "num_classes": 0, "ignore_index": 255, "class_names": ()}),
    # The scenes' own options; their pixels are already normalized and their patch labels made by their generator,
    # so normalization "" (the backbone's, unused) and label_rule "union" only say so in results.json.
    "scenes": DataSet(_scenes, {**SOURCES["scenes"].options, "normalization": "", "label_rule": "union"}),
}


def data_options(data_cfg) -> ml_collections.ConfigDict:
    """`config.data` over its data set's defaults (DATASETS[name].options): what the readers read."""
    given = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
    name = given.get("name")
    if name not in DATASETS:
        *others, last = (repr(n) for n in DATASETS)
        raise ValueError(f"Unknown config.data.name {name!r}; choose {', '.join(others)} or {last}.")
    return ml_collections.ConfigDict({**DATASETS[name].options, **given})


def probe_splits(config, image_size: int, patch_size: int, normalization: str,
                 seed: int | None = None) -> tuple[dict, list]:
    """({'train', 'val', 'test'}: ProbeSplit, class names) for `config.data`. `seed`: the embedded scenes' seed
    (a training run's `config.seed`; default `config.data.seed`, else 0)."""
    name = data_options(config.data).name
    return DATASETS[name].splits(config, image_size, patch_size, normalization, seed)
