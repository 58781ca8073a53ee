"""The patch-level probe on any segmentation data set stored as images + label PNGs (one class id per pixel).

    python -m lalign.probe --config=configs/probe/folder.py --config.backbone=PATH --workdir=DIR \
        --config.data.train_images=D/img/train --config.data.train_labels=D/lbl/train \
        --config.data.test_images=D/img/val --config.data.test_labels=D/lbl/val \
        --config.data.num_classes=150 --config.data.ignore_index=255

Images and label PNGs are paired by file stem. Without data.val_images/val_labels, a seeded random
`data.num_val` training images are the validation split (epoch selection). Everything else as
configs/probe/coco_stuff.py (the paper's probe settings; on a small data set warm-up is a fifth of the steps, not
500: `probe.warmup_fraction`, and the log says when a schedule is very short). `:smoke` shrinks the run.
"""
from ml_collections import config_dict

from lalign import config
from lalign.data import probe_splits


def get_config(arg: str = "full"):
    arg = arg or "full"
    if arg not in ("full", "smoke"):
        raise ValueError(f"configs/probe/folder.py takes 'full' or 'smoke', got {arg!r}.")
    c = config.probe_defaults()  # the paper's probe (lalign/config.py, PROBE_SCHEMA); what follows changes it
    c.model = dict(variant=config_dict.placeholder(str), act=config_dict.placeholder(str),
                   ln_eps=config_dict.placeholder(float), num_heads=config_dict.placeholder(int))
    c.data = dict(name="folder", **probe_splits.DATASETS["folder"].options)  # lalign/data/probe_splits.py
    c.features.update(store="disk", dtype="float16")
    c.probe.warmup_fraction = 0.2  # as configs/probe/coco_stuff.py: the paper's 500 warm-up steps fill a small set
    if arg == "smoke":
        c.data.update(num_train=64, num_val=16, num_test=32, num_threads=4)
        c.features.update(batch_size=16, store="memory", dtype="float32")
        c.probe.update(epochs=2, warmup_steps=4)
    return c
