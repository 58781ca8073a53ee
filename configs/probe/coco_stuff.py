"""The patch-level probe (docs/design.md) on COCO-Stuff (the paper's locality benchmark), for one frozen backbone.

    python -m lalign.probe --config=configs/probe/coco_stuff.py --config.backbone=PATH \
        --config.data.root=/data/cocostuff --workdir=DIR [--config.backbone_format=bigvision]

PATH: a lalign orbax params dir, a MaskEmbed checkpoint step dir (WORKDIR/checkpoints/best/STEP: its aligned
student) or a pipeline WORKDIR (the same, newest best step), a big_vision .npz, a Hugging Face directory or a timm
.safetensors. What a checkpoint cannot tell goes in `config.model` (e.g. --config.model.act=quick_gelu
--config.model.ln_eps=1e-5 for a CLIP npz; --config.model.variant=B/16), and --config.data.normalization=clip for
CLIP (default: 'clip' for a CLIP-like ViT with pre-norm and class token, else SigLIP's [-1, 1]).

Data: ROOT/images/{train2017,val2017}/*.jpg and ROOT/stuffthingmaps/{train2017,val2017}/*.png (182 classes,
255 unlabeled; lalign/data/segmentation.py). COCO-Stuff has no test split: a seeded random 5,000 images of
train2017 are the validation split (the epoch is chosen there) and val2017 (5,000 images) is the reported test
split. Images: shorter side resized to the backbone's size, centre crop; patch label = every class present in the
patch (`data.label_rule`: 'union', or 'majority' / 'global_union' for ablations and controls).

Probe (the paper's, docs/design.md): 2 transformer blocks at the backbone width, LayerScale 0.01,
LayerNorm + Dense -> 182;
per-patch BCE; AdamW lr 1e-3 with 500 warmup steps and cosine decay to 1e-4; batch 32; 5 epochs; macro recall at
0.5 at the chosen epoch (by validation mIoU: `probe.select_by`). Weight decay 0.01 (PyTorch's AdamW default; the
paper names none).
Expected (paper, CLIP ViT-B/16 at 224): teacher 44.6, MaskEmbed 46.3 macro recall.

Cost: features of ~123k images are extracted once and stored as float16 memmaps under DIR/features
(B/16 at 224: 196 x 768 x 2 bytes = 0.3 MB per image, ~36 GB; labels 36 kB per image, ~4.4 GB), then the probe
runs 5 x 3,540 steps. `:smoke` runs the same code on 64/16/32 images for a quick check.
"""
from ml_collections import config_dict

from lalign import config
from lalign.data import probe_splits


def get_config(arg: str = "full"):
    arg = arg or "full"
    if arg not in ("full", "smoke"):
        raise ValueError(f"configs/probe/coco_stuff.py takes 'full' or 'smoke', got {arg!r}.")
    # lalign's probe defaults (lalign/config.py, PROBE_SCHEMA: the paper's probe); what follows is what changes.
    # `python -m lalign.config configs/probe/coco_stuff.py` lists every field.
    c = config.probe_defaults()
    # c.backbone: required, the checkpoint path (see the docstring); c.backbone_format "" = guessed from the path
    # ViT fields a checkpoint cannot tell (None = from the checkpoint / big_vision defaults).
    c.model = dict(variant=config_dict.placeholder(str), act=config_dict.placeholder(str),
                   ln_eps=config_dict.placeholder(float), num_heads=config_dict.placeholder(int))

    # data.root (required): the directory holding images/ and stuffthingmaps/. The options and their defaults
    # (lalign/data/probe_splits.py, DATASETS): image_size 0 = the backbone's, normalization "" = the backbone's,
    # 5,000 validation images carved out of train2017 (seeded by split_seed), all of val2017 the test split.
    c.data = dict(name="coco_stuff", **probe_splits.DATASETS["coco_stuff"].options)
    c.features.update(store="disk", dtype="float16")  # DIR/features/*.npy: COCO's features exceed memory
    # Deviation for small data only: warm-up = min(warmup_steps, warmup_fraction x all steps). The paper's 500 steps
    # stay exactly as they are on COCO-Stuff (17,705 steps) and ADE20K (2,850); 5 epochs of CamVid's 367 images
    # are 60 steps, all warm-up at 500 (lalign/probe/heads.py, probe_schedule).
    c.probe.warmup_fraction = 0.2
    # (probe.select_by 'miou', the default, is a deviation too: lalign/config.py says why.)

    if arg == "smoke":
        c.data.update(num_train=64, num_val=16, num_test=32, num_threads=4)
        c.features.update(batch_size=16, store="memory", dtype="float32")
        c.probe.update(epochs=2, warmup_steps=4)
    return c
