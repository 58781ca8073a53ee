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
import ml_collections

from ml_collections import config_dict


def get_config(arg: str = "full"):
    arg = arg or "full"
    if arg not in ("full", "smoke"):
        raise ValueError(f"configs/probe/folder.py takes 'full' or 'smoke', got {arg!r}.")
    c = ml_collections.ConfigDict()
    c.backbone = ""
    c.backbone_format = ""
    c.model = dict(variant=config_dict.placeholder(str), act=config_dict.placeholder(str),
                   ln_eps=config_dict.placeholder(float), num_heads=config_dict.placeholder(int))
    c.compute_dtype = ""
    # A checkpoint of another grid than data.image_size's (DINOv2: 37x37 at 518 px): its position table resized
    # as training resizes a teacher (checkpoints.load.fit_posemb; bicubic_antialias = timm's checkpoint filter).
    c.posemb_resize = "bicubic_antialias"  # bicubic_antialias | bicubic | bilinear_antialias | none (refuse)
    c.data = dict(name="folder", train_images="", train_labels="", val_images="", val_labels="",
                  test_images="", test_labels="", num_classes=0, ignore_index=255, class_names=(),
                  image_size=0, normalization="", label_rule="union", min_pixels=1,
                  num_train=-1, num_val=1000, num_test=-1, split_seed=0, num_threads=16)
    c.features = dict(batch_size=64, store="disk", dtype="float16")
    c.probe = dict(depth=2, epochs=5, batch_size=32, lr=1e-3, lr_min_ratio=0.1, warmup_steps=500, wd=0.01,
                   seeds=(0,),
                   # Deviation for small data only: warm-up = min(warmup_steps, warmup_fraction x all steps). The
                   # paper's 500 steps stay exactly as they are on COCO-Stuff (17,705 steps) and ADE20K (2,850);
                   # 5 epochs of CamVid's 367 images are 60 steps, all warm-up at 500 (lalign/probe/heads.py,
                   # probe_schedule). None: warmup_steps alone.
                   warmup_fraction=0.2,
                   # Deviation: the epoch is chosen by validation mIoU, not by the paper's validation macro recall
                   # (still the reported metric): recall is won by a probe that predicts every class everywhere
                   # (lalign/probe/metrics.py, SELECT_BY). "recall" selects as the paper does.
                   select_by="miou",
                   # Largest evaluation chunk; the chunk is the smallest split rounded up to a power of two, within
                   # what a training step's activations allow (lalign/probe/heads.py, eval_chunk).
                   eval_batch_size=512)
    c.image_probe = False
    if arg == "smoke":
        c.data.update(num_train=64, num_val=16, num_test=32, num_threads=4)
        c.features.update(batch_size=16, store="memory", dtype="float32")
        c.probe.update(epochs=2, warmup_steps=4)
    return c
