"""MaskEmbed on SigLIP So400m/14 at 384 px (MAP head): the paper's recipe on ImageNet-21k.

    # on every host of the slice (README, "Running on a TPU pod slice"):
    python -m lalign.main --config=configs/siglip_so400m.py --workdir=gs://BUCKET/lalign/siglip_so400m \\
        --config.init_from=/data/siglip-so400m-patch14-384 --config.data.path=/data/imagenet21k/train
    # tiny, on CPU, no download (random teacher, synthetic scenes):
    python -m lalign.main --config=configs/siglip_so400m.py:smoke --workdir=/tmp/smoke_so400m
    # the same tiny model as a multi-host job on this machine, on JPEG files (README, "Pod rehearsal"):
    bash scripts/pod_rehearsal.sh --processes 4 --devices 2 --steps 30 --sigterm-at 12   # uses :smoke_folder

Teacher (`init_from`): a SigLIP So400m/14 384 px image tower in any format lalign reads: a Hugging Face
directory of `google/siglip-so400m-patch14-384`, a big_vision SigLIP `.npz` (two-tower files: the image tower is
read), a timm state dict or an orbax params directory. 27 x 14 = 378 < 384: the last 6 pixel rows and columns
are outside the patch grid and masked to zero for the teacher (lalign.maskembed.pixel_mask).

Data: ImageNet-21k, winter 2021 release, 13,153,500 images in class folders (`data.path`); 10,240 of them are
held out for validation (a fixed random subset; `data.val_path` names a separate folder instead). Listing 13M
files takes minutes on every host: write the list once with `python -m lalign.data.image_folder ROOT LIST` and
pass `--config.data.file_list=LIST`. Random-resized-crop (area 8-100%, ratio 3/4-4/3) + flip, SigLIP
normalization ([-1, 1]).

Recipe (DESIGN.md): 5 epochs at global batch 1024 = ceil(5 x 13,153,500 / 1024) = 64,227 steps; AdamW b1 0.9,
b2 0.95, wd 0.01, clip 1.0, lr 2e-4 cosine to 2e-5, no warmup; teacher target = penultimate block + final norm;
bf16 compute, fp32 master weights; nn.scan over blocks with full rematerialization; the checkpoint with the best
validation loss is kept (`checkpoints/best`).

Expected result: a student whose patch tokens are locally semantic while the global knowledge is kept; the
paper reports that the aligned backbone beats its teacher on the patch-level probe (for CLIP ViT-B/16 on
COCO-Stuff: macro recall 44.6 -> 46.3, DESIGN.md) and that VLMs trained on aligned backbones improve on
spatial-understanding benchmarks. The losses in metrics.jsonl are relative to predicting the mean target (1.0).
No run of this config has been made here: the figures below are estimates.

--- memory and runtime estimate (python -m lalign.memory --config=configs/siglip_so400m.py --update_docstring) ---
256 devices (TPU v4), mesh data=16 fsdp=16 tensor=1; batch 1024 = 4 images per device;
729 tokens per image, remat_policy 'nothing_saveable'. Bytes per device:
  student + proj + decoder, fp32 (448.4M params)        107.7 MiB
  gradients, fp32                                       107.7 MiB
  AdamW moments, 2 x fp32                               215.4 MiB
  target teacher, 26 block(s), bfloat16                  47.8 MiB
  full teacher, fp32 (at init only)                     102.9 MiB
  activations (rough model, lalign/memory.py)            2.33 GiB
  target statistics pass (before training; not added)   771.0 MiB
  total per device (the larger of the two above)         2.90 GiB   (of 32 GiB HBM)
Runtime, ESTIMATE: 4.41 TFLOP/image (lalign.bench FLOP model) x 65.77M images
on v4-512 (256 x TPU v4) at an assumed 40% MFU: 2.9 h.
--- end of estimate ---
"""
import math

import ml_collections

IMAGENET21K_IMAGES = 13_153_500  # winter 2021 release
EPOCHS = 5
BATCH = 1024


def get_config(arg: str = "full"):
    arg = arg or "full"
    if arg not in ("full", "smoke", "smoke_folder"):
        raise ValueError(f"configs/siglip_so400m.py takes 'full', 'smoke' or 'smoke_folder', got {arg!r}.")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ("maskembed",)
    c.init_from = ""  # required: the teacher checkpoint (see the docstring)
    c.init_format = ""  # "" = guess from the path
    c.init_posemb_resize = "bicubic_antialias"  # a checkpoint of another grid: resized as timm does

    c.data = dict(name="image_folder", path="", val_path="", num_val=10_240, file_list="", image_size=384,
                  normalization="siglip", crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True,
                  val_crop_fraction=1.0, num_workers=0, prefetch=True)
    # What a checkpoint cannot tell: the layout and rematerialization (the rest is read from the checkpoint).
    c.model = dict(variant="So400m/14", pool_type="map", posemb="learn", scan=True, remat_policy="nothing_saveable",
                   attention_impl="xla")

    c.maskembed = dict(
        sampler="uniform",  # uniform | bernoulli | block
        keep_prob=0.5,  # bernoulli: probability that a patch is *kept*
        num_blocks=1,  # block: rectangles kept per mask
        antithetic=True,  # add the complement 1-m
        include_ones=True,  # add the all-ones mask
        target_layer="penultimate",  # the paper's default
        loss="mse",  # mse | cosine | l1 | mse_masked | mse_unmasked
        decoder_depth=2,
        attn_softcap=None,
        normalize_targets=True,
        whiten_targets=False,  # True: ZCA-whitened targets, every feature direction weighed equally (not the paper)
        target_std_batches=4,
        teacher_dtype="bfloat16",
        student_dtype="bfloat16",
    )
    c.total_steps = math.ceil(EPOCHS * IMAGENET21K_IMAGES / BATCH)  # 64,227
    c.batch_size = BATCH
    c.grad_accum_steps = 1  # >1: micro-batches with the same gradient, for slices with less memory per chip
    # weight_decay_on "reference": no decay on biases, norms and LayerScale, as timm's optimizer factory does
    c.optimizer = dict(lr=2e-4, wd=0.01, b1=0.9, b2=0.95, grad_clip=1.0, warmup_steps=0, lr_min_ratio=0.1,
                       weight_decay_on="reference")
    c.mesh = dict(data=-1, fsdp=16, tensor=1, num_devices=0)  # -1: the remaining devices; num_devices 0: all
    c.sharding_rules = ()  # () = lalign.sharding.DEFAULT_RULES
    c.log_every = 50
    c.eval_every = 2000
    c.checkpoint_every = 500
    c.val_batches = 10
    c.async_checkpointing = True
    c.quiet = False
    # Used only by `python -m lalign.memory` (the docstring's estimate): the slice it assumes.
    c.estimate = dict(slice="v4-512", chip="TPU v4", devices=256, mfu=0.4)
    # DESIGN.md's probe (runs only when "probe" is a stage; its data is the embedded scenes).
    c.probe = dict(num_train=4000, num_val=500, num_test=1000, depth=2, epochs=5, batch_size=32, lr=1e-3,
                   lr_min_ratio=0.1, warmup_steps=500, wd=1e-4, seeds=(0,))

    if arg.startswith("smoke"):  # the same family (MAP head, patch grid not covering the image, scan + remat), tiny
        c.init_from = "random"
        c.data = dict(name="scenes", image_size=30, patch_size=7, min_objects=1, max_objects=2, digit_size=(8, 12),
                      num_colours=1, min_patch_pixels=4, max_overlap=0.2)
        c.model = dict(variant=None, width=32, depth=2, mlp_dim=72, num_heads=2, patch_size=7, pool_type="map",
                       posemb="learn", scan=True, remat_policy="nothing_saveable",
                       attention_impl="xla")
        c.maskembed.target_std_batches = 1
        c.total_steps = 2
        c.batch_size = 8
        c.mesh = dict(data=-1, fsdp=1, tensor=1, num_devices=0)
        c.log_every = 1
        c.eval_every = 2
        c.checkpoint_every = 0
        c.val_batches = 1
        c.async_checkpointing = False
    if arg == "smoke_folder":  # the smoke model on real image files (--config.data.path=DIR): `lalign.rehearse`
        c.data = dict(name="image_folder", path="", val_path="", num_val=16, file_list="", image_size=30,
                      normalization="siglip", crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True,
                      val_crop_fraction=1.0, num_workers=2, prefetch=True)
        c.total_steps = 30
        c.eval_every = 10
        c.checkpoint_every = 5
        c.async_checkpointing = True
    return c
