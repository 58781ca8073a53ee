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
import ml_collections
from ml_collections import config_dict


def get_config(arg: str = "full"):
    arg = arg or "full"
    if arg not in ("full", "smoke"):
        raise ValueError(f"configs/probe/coco_stuff.py takes 'full' or 'smoke', got {arg!r}.")
    c = ml_collections.ConfigDict()
    c.backbone = ""  # required: checkpoint path (see the docstring)
    c.backbone_format = ""  # orbax | bigvision | hf | timm; "" = guessed from the path
    # ViT fields a checkpoint cannot tell (None = from the checkpoint / big_vision defaults).
    c.model = dict(variant=config_dict.placeholder(str), act=config_dict.placeholder(str),
                   ln_eps=config_dict.placeholder(float), num_heads=config_dict.placeholder(int))
    c.compute_dtype = ""  # e.g. 'bfloat16' for feature extraction on accelerators; "" = float32
    # A checkpoint of another grid than data.image_size's (DINOv2: 37x37 at 518 px): its position table resized
    # as training resizes a teacher (checkpoints.load.fit_posemb; bicubic_antialias = timm's checkpoint filter).
    c.posemb_resize = "bicubic_antialias"  # bicubic_antialias | bicubic | bilinear_antialias | none (refuse)

    c.data = dict(
        name="coco_stuff",
        root="",  # required: the directory holding images/ and stuffthingmaps/
        image_size=0,  # 0 = the backbone's (learned position embedding grid x patch size)
        normalization="",  # siglip | clip | imagenet | none; "" = guessed from the backbone
        label_rule="union",  # union | majority | global_union
        min_pixels=1,  # union: a class is in a patch when it covers at least this many of its pixels
        num_train=-1,  # -1 = all of train2017 minus the validation images
        num_val=5000,  # carved out of train2017 (seeded by split_seed)
        num_test=-1,  # -1 = all of val2017
        split_seed=0,
        num_threads=16,  # image decoding threads
    )
    c.features = dict(batch_size=64, store="disk", dtype="float16")  # store: memory | disk (DIR/features/*.npy)
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
    c.image_probe = False  # logistic regression per class on pooled features (slow at COCO scale)

    if arg == "smoke":
        c.data.update(num_train=64, num_val=16, num_test=32, num_threads=4)
        c.features.update(batch_size=16, store="memory", dtype="float32")
        c.probe.update(epochs=2, warmup_steps=4)
    return c
