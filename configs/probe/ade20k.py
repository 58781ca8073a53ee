"""The patch-level probe on ADE20K SceneParsing (150 classes), the reference's second locality benchmark.

    python -m lalign.probe --config=configs/probe/ade20k.py --config.backbone=PATH \
        --config.data.root=/data/ADEChallengeData2016 --workdir=DIR

Data: the ADEChallengeData2016 layout, ROOT/images/{training,validation}/*.jpg and
ROOT/annotations/{training,validation}/*.png; PNG value 0 is "other" and counts for no class, k = 1..150 is class
k-1 (lalign/data/segmentation.py). ADE20K has no public test labels: a seeded random 2,000 images of training are
the validation split (the epoch is chosen there) and validation (2,000 images) is the reported test split.
Everything else (backbone, images, patch labels, probe recipe) is configs/probe/coco_stuff.py's.

Cost: 20,210 + 2,000 images; B/16 at 224 stores ~6.6 GB of float16 features.
"""
from lalign.configs.probe import coco_stuff


def get_config(arg: str = "full"):
    arg = arg or "full"
    if arg not in ("full", "smoke"):
        raise ValueError(f"configs/probe/ade20k.py takes 'full' or 'smoke', got {arg!r}.")
    c = coco_stuff.get_config(arg)
    c.data.name = "ade20k"
    c.data.root = ""  # required: the ADEChallengeData2016 directory (images/, annotations/)
    if arg == "full":
        c.data.num_val = 2000
    return c
