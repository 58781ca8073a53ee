"""MaskEmbed on SigLIP So400m/14 at 384 px (MAP head): the paper's recipe on ImageNet-21k.

    # on every host of the slice (README, "TPU pod slice"):
    python -m lalign.main --config=configs/siglip_so400m.py --workdir=gs://BUCKET/lalign/siglip_so400m \\
        --config.init_from=/data/siglip-so400m-patch14-384 --config.data.path=/data/imagenet21k/train
    # tiny, on CPU, no download (random teacher, synthetic scenes):
    python -m lalign.main --config=configs/siglip_so400m.py:smoke --workdir=/tmp/smoke_so400m
    # the same tiny model as a multi-host job on this machine, on JPEG files (README, "TPU pod slice"):
    bash scripts/pod_rehearsal.sh --processes 4 --devices 2 --steps 30 --sigterm-at 12   # uses :smoke_folder

Teacher (`init_from`): a SigLIP So400m/14 384 px image tower in any format lalign reads: a Hugging Face
directory of `google/siglip-so400m-patch14-384`, a big_vision SigLIP `.npz` (two-tower files: the image tower is
read), a timm state dict or an orbax params directory. 27 x 14 = 378 < 384: the last 6 pixel rows and columns
are outside the patch grid and masked to zero for the teacher (lalign.maskembed.pixel_mask).

Data: ImageNet-21k, winter 2021 release, 13,153,500 images in class folders (`data.path`); 10,240 of them are
held out for validation (a fixed random subset; `data.val_path` names a separate folder instead). Listing 13M
files takes minutes on every host: write the list once with `python -m lalign.data.image_folder ROOT LIST` and
pass `--config.data.file_list=LIST`. timm's 'rkrc' crop (the reference's) + flip, SigLIP
normalization ([-1, 1]).

Recipe (configs/common.py): 5 epochs at global batch 1024 = ceil(5 x 13,153,500 / 1024) = 64,227 steps; AdamW b1 0.9,
b2 0.95, wd 0.01, clip 1.0, lr 2e-4 cosine to 2e-5, no warmup; teacher target = penultimate block + final norm;
bf16 compute, fp32 master weights; nn.scan over blocks with full rematerialization; the checkpoint with the best
validation loss is kept (`checkpoints/best`).
At another global batch (`--config.batch_size`) the lr follows from batch 1024 by the square-root rule
(`optimizer.lr_base_batch`, `optimizer.lr_scale_rule`), and the log says so.
The locality meter (lalign/watch.py) probes student and teacher at each validation on a labelled folder:
`--config.watch.images=DIR --config.watch.labels=DIR --config.watch.num_classes=N`.

Expected result: a student whose patch tokens are locally semantic while the global knowledge is kept; the
paper reports that the aligned backbone beats its teacher on the patch-level probe (for CLIP ViT-B/16 on
COCO-Stuff: macro recall 44.6 -> 46.3) and that VLMs trained on aligned backbones improve on
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

from lalign.configs import common


def get_config(arg: str = "full"):
    arg = common.check_arg(arg, "configs/siglip_so400m.py", ("full", "smoke", "smoke_folder"))
    c = common.maskembed_imagenet21k(
        image_size=384, lr=2e-4, fsdp=16,
        model=dict(variant="So400m/14", pool_type="map", posemb="learn", scan=True, remat_policy="nothing_saveable",
                   attention_impl="xla"))
    c.estimate = dict(slice="v4-512", chip="TPU v4", devices=256, mfu=0.4)
    if arg.startswith("smoke"):  # the same family (MAP head, patch grid not covering the image, scan + remat), tiny
        common.smoke(c, image_size=30, patch_size=7,
                     model=dict(width=32, depth=2, mlp_dim=72, num_heads=2, pool_type="map", scan=True,
                                remat_policy="nothing_saveable"))
    if arg == "smoke_folder":
        common.smoke_folder(c)
    return c
