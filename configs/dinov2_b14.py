"""MaskEmbed on DINOv2 ViT-B/14 with 4 registers at 224 px (class token): the reference's DINOv2 recipe on
ImageNet-21k (its configs/dinov2-vit-b.yaml: teacher vit_base_patch14_reg4_dinov2.lvd142m, img_size 224).

    # on every host of the slice (README, "TPU pod slice"):
    python -m lalign.main --config=configs/dinov2_b14.py --workdir=gs://BUCKET/lalign/dinov2_b14 \\
        --config.init_from=/data/vit_base_patch14_reg4_dinov2.lvd142m/model.safetensors \\
        --config.data.path=/data/imagenet21k/train
    # tiny, on CPU, no download (random teacher, synthetic scenes):
    python -m lalign.main --config=configs/dinov2_b14.py:smoke --workdir=/tmp/smoke_dinov2_b14

Teacher (`init_from`): a DINOv2 ViT-B/14 with registers: timm's `vit_base_patch14_reg4_dinov2.lvd142m` state dict
(`model.safetensors`; the `config.json` beside it gives the normalization), a Hugging Face directory of
`facebook/dinov2-with-registers-base` (Dinov2WithRegistersModel), or an orbax params directory. DINOv2's extras
are part of the model: a class token ('tok' pool) and 4 registers after it (no position rows), LayerScale in
every block, exact GELU, LayerNorm eps 1e-6. The checkpoints hold a 37 x 37 position table (518 px); it is
resized to 16 x 16 patches of 14 px (224 px, covered exactly) as timm's checkpoint filter does
(`init_posemb_resize`: bicubic with antialias), which is how the reference loads its teacher.
A checkpoint that records its model (HF directory, lalign's files) decides every field of it; the run's log
says which fields came from the checkpoint and which from `config.model`, and the workdir records the result
(resolved.json), which `lalign.export` and `lalign.probe` read.

Data: ImageNet-21k, winter 2021 release, 13,153,500 images in class folders (`data.path`); 10,240 of them are
held out for validation (a fixed random subset; `data.val_path` names a separate folder instead). Listing 13M
files takes minutes on every host: write the list once with `python -m lalign.data.image_folder ROOT LIST` and
pass `--config.data.file_list=LIST`. timm's 'rkrc' crop (the reference's) + flip, ImageNet normalization (mean
0.485/0.456/0.406, std 0.229/0.224/0.225), read from the teacher checkpoint as the reference takes it from the
teacher's pretrained_cfg (`data.normalization` "": the checkpoint's; a name overrides it).

Recipe (configs/common.py): 5 epochs at global batch 1024 = ceil(5 x 13,153,500 / 1024) = 64,227 steps; AdamW b1 0.9,
b2 0.95, wd 0.01, clip 1.0, lr 3e-4 cosine to 3e-5, no warmup; teacher target = penultimate block + final norm;
bf16 compute, fp32 master weights; nn.scan over blocks, no rematerialization (activations fit); the
checkpoint with the best validation loss is kept (`checkpoints/best`).
At another global batch (`--config.batch_size`) the lr follows from batch 1024 by the square-root rule
(`optimizer.lr_base_batch`, `optimizer.lr_scale_rule`), and the log says so.

Expected result: a student whose patch tokens are locally semantic while the global knowledge is kept (the paper
aligns DINOv2 among its other teachers). The losses in metrics.jsonl are relative to predicting the mean target
(1.0). No run of this config has been made here: the figures below are estimates.

--- memory and runtime estimate (python -m lalign.memory --config=configs/dinov2_b14.py --update_docstring) ---
32 devices (TPU v4), mesh data=32 fsdp=1 tensor=1; batch 1024 = 32 images per device;
261 tokens per image, remat_policy 'none'. Bytes per device:
  student + proj + decoder, fp32 (101.3M params)        386.4 MiB
  gradients, fp32                                       386.4 MiB
  AdamW moments, 2 x fp32                               772.8 MiB
  target teacher, 11 block(s), bfloat16                 150.0 MiB
  full teacher, fp32 (at init only)                     327.0 MiB
  activations (rough model, lalign/memory.py)            6.32 GiB
  target statistics pass (before training; not added)   816.1 MiB
  total per device (the larger of the two above)         8.30 GiB   (of 32 GiB HBM)
Runtime, ESTIMATE: 0.34 TFLOP/image (lalign.bench FLOP model) x 65.77M images
on v4-64 (32 x TPU v4) at an assumed 40% MFU: 1.8 h.
--- end of estimate ---
"""

from lalign.configs import common

# DINOv2's extras (timm's vit_*_reg4_dinov2): class token, registers without position rows, LayerScale, exact GELU.
DINOV2 = dict(pool_type="tok", class_token=True, cls_posemb=False, num_registers=4, layerscale_init=1e-5,
              act="gelu_exact", ln_eps=1e-6)


def get_config(arg: str = "full"):
    arg = common.check_arg(arg, "configs/dinov2_b14.py", ("full", "smoke"))
    c = common.maskembed_imagenet21k(
        image_size=224, lr=3e-4, fsdp=1,
        model=dict(variant="B/14", posemb="learn", scan=True, remat_policy="none", attention_impl="xla", **DINOV2))
    if arg.startswith("smoke"):  # the same family (class token, registers, LayerScale, patch 14, scan), tiny
        common.smoke(c, image_size=56, patch_size=14,
                     model=dict(width=32, depth=2, mlp_dim=128, num_heads=2, scan=True, remat_policy="none",
                                **DINOV2))
    return c
