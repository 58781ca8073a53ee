"""What the real configs share: the paper's MaskEmbed recipe on ImageNet-21k (as big_vision keeps shared snippets
in configs/proj/*/common.py). A real config names only what differs: the teacher's architecture, resolution,
normalization, learning rate, memory options and mesh.

Recipe (the reference's, iancovert/locality-alignment): 5 epochs at global batch 1024, AdamW b1 0.9, b2 0.95, weight
decay 0.01 on every parameter (its train.py gives timm's optimizer factory no module, so no groups), gradient clip
1.0, cosine decay to 10% of the peak, no warmup (the peak lr belongs to batch 1024: another batch scales it,
square-root rule); uniform masks with their complements and the all-ones mask; teacher target = the penultimate
block + final norm; MSE on standardized targets; a 2-block decoder; bf16 compute, fp32 master weights; timm's 'rkrc'
crop (ResizeKeepRatio + CenterCropOrPad; bilinear or bicubic at random per image, bicubic for validation) + flip;
the checkpoint with the best validation loss is kept.
"""
import ml_collections

from lalign import config
from lalign.data import image_folder as image_folder_source
from lalign.data import images


def check_arg(arg: str, path: str, choices=("full", "smoke")) -> str:
    arg = arg or "full"
    if arg not in choices:
        raise ValueError(f"{path} takes {', '.join(repr(c) for c in choices[:-1])} or {choices[-1]!r}, got {arg!r}.")
    return arg


def image_folder(image_size: int, normalization: str = "", **kw) -> dict:
    """config.data for an image folder (ImageNet-21k in class folders), the reference's training augmentation.
    normalization "" (or "auto"): the teacher checkpoint's, as the reference takes it from the teacher's timm
    pretrained_cfg (lalign/pipeline.py: resolve_normalization); a name (siglip | clip | imagenet) overrides it."""
    # Every option at the source's default (lalign/data/images.py COMMON_OPTIONS: the reference's rkrc crop with
    # bilinear or bicubic at random per training image, flip; image_folder.py OPTIONS), so each can be overridden
    # from the command line. `seed` (another data order than the run's) and `patch_size` (the scenes') are left out.
    common = {k: v for k, v in images.COMMON_OPTIONS.items() if k not in ("seed", "patch_size")}
    return {"name": "image_folder", **common, **image_folder_source.OPTIONS, "image_size": image_size,
            "normalization": normalization, "num_val": 10_240, **kw}


def maskembed_imagenet21k(*, image_size: int, lr: float, model: dict, normalization: str = "",
                          fsdp: int = 1) -> ml_collections.ConfigDict:
    """The whole run config of the paper's recipe for one teacher: lalign's defaults (lalign/config.py, the
    reference's recipe; `python -m lalign.config` lists every field) with the teacher's own lr, resolution,
    normalization, model options and mesh."""
    c = config.defaults()
    c.init_from = ""  # required: the teacher checkpoint
    c.data = image_folder(image_size, normalization)
    # What a checkpoint cannot tell: the layout and rematerialization (the rest is read from the checkpoint).
    c.model = dict(model)
    c.optimizer.lr = lr  # at global batch optimizer.lr_base_batch (1024); another batch scales it (sqrt rule)
    # The locality meter at each validation (lalign/watch.py) needs a labelled folder you supply:
    # --config.watch.source=folder --config.watch.images=DIR --config.watch.labels=DIR --config.watch.num_classes=N
    # (or source="coco_stuff" / "ade20k" with watch.root). No images: the student's token agreement only.
    c.watch.source = "folder"
    c.mesh.fsdp = fsdp
    c.estimate.update(slice="v4-64", devices=32)  # used by `python -m lalign.memory` (the docstring's estimate)
    return c


def smoke(c: ml_collections.ConfigDict, *, image_size: int, patch_size: int, model: dict) -> None:
    """The same family, tiny, on CPU without a download: a random teacher on the embedded scenes, 2 steps."""
    c.init_from = "random"
    c.data = dict(name="scenes", image_size=image_size, patch_size=patch_size, min_objects=1, max_objects=2,
                  digit_size=(8, 12), num_colours=1, min_patch_pixels=4, max_overlap=0.2)
    c.model = dict(dict(variant=None, patch_size=patch_size, posemb="learn", attention_impl="xla"), **model)
    c.maskembed.target_std_batches = 1
    c.total_steps = 2
    c.batch_size = 8
    c.mesh = dict(data=-1, fsdp=1, tensor=1, num_devices=0)
    c.log_every = 1
    c.eval_every = 2
    c.checkpoint_every = 0
    c.val_batches = 1
    c.async_checkpointing = False


def smoke_folder(c: ml_collections.ConfigDict) -> None:
    """`smoke`'s model on real image files (--config.data.path=DIR), 30 steps with checkpoints: what
    `lalign.rehearse` (the pod rehearsal) runs."""
    # Decoding by threads of each host process (num_workers 0): a localhost rehearsal of several hosts shares its
    # few cores; grain worker processes are tested on their own (tests/test_data.py).
    c.data = image_folder(c.data.image_size, "siglip", num_val=16)
    c.total_steps = 30
    c.eval_every = 10
    c.checkpoint_every = 5
    c.async_checkpointing = True
