"""MaskEmbed on CLIP ViT-L/14 at 336 px (class token): the paper's recipe on ImageNet-21k.

    # on every host of the slice (README, "TPU pod slice"):
    python -m lalign.main --config=configs/clip_l14_336.py --workdir=gs://BUCKET/lalign/clip_l14_336 \\
        --config.init_from=/data/clip-vit-large-patch14-336 --config.data.path=/data/imagenet21k/train
    # tiny, on CPU, no download (random teacher, synthetic scenes):
    python -m lalign.main --config=configs/clip_l14_336.py:smoke --workdir=/tmp/smoke_clip_l14_336

Teacher (`init_from`): a CLIP ViT-L/14 336 px image tower: a Hugging Face directory of
`openai/clip-vit-large-patch14-336` (CLIPModel or CLIPVisionModel), a timm state dict or an orbax params
directory. CLIP's extras are part of the model: class token ('tok' pool) with its own position row, a
LayerNorm before the encoder, quick-gelu, LayerNorm eps 1e-5, no patch-embedding bias.
24 x 14 = 336: the patches cover the image exactly.

Data: ImageNet-21k, winter 2021 release, 13,153,500 images in class folders (`data.path`); 10,240 of them are
held out for validation (a fixed random subset; `data.val_path` names a separate folder instead). Listing 13M
files takes minutes on every host: write the list once with `python -m lalign.data.image_folder ROOT LIST` and
pass `--config.data.file_list=LIST`. timm's 'rkrc' crop (the reference's) + flip, CLIP normalization
(mean 0.481/0.458/0.408, std 0.269/0.261/0.276).

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

--- memory and runtime estimate (python -m lalign.memory --config=configs/clip_l14_336.py --update_docstring) ---
128 devices (TPU v4), mesh data=8 fsdp=16 tensor=1; batch 1024 = 8 images per device;
577 tokens per image, remat_policy 'nothing_saveable'. Bytes per device:
  student + proj + decoder, fp32 (331.4M params)         79.7 MiB
  gradients, fp32                                        79.7 MiB
  AdamW moments, 2 x fp32                               159.4 MiB
  target teacher, 23 block(s), bfloat16                  35.0 MiB
  full teacher, fp32 (at init only)                      73.0 MiB
  activations (rough model, lalign/memory.py)            3.05 GiB
  target statistics pass (before training; not added)  1002.0 MiB
  total per device (the larger of the two above)         3.47 GiB   (of 32 GiB HBM)
Runtime, ESTIMATE: 2.54 TFLOP/image (lalign.bench FLOP model) x 65.77M images
on v4-256 (128 x TPU v4) at an assumed 40% MFU: 3.3 h.
--- end of estimate ---
"""

from lalign.configs import common


def get_config(arg: str = "full"):
    arg = common.check_arg(arg, "configs/clip_l14_336.py", ("full", "smoke"))
    c = common.maskembed_imagenet21k(
        image_size=336, lr=2e-4, fsdp=16,
        model=dict(variant="L/14", pool_type="tok", pre_norm=True, cls_posemb=True, act="quick_gelu", ln_eps=1e-5,
                   patch_bias=False, posemb="learn", scan=True, remat_policy="nothing_saveable", attention_impl="xla"))
    c.estimate = dict(slice="v4-256", chip="TPU v4", devices=128, mfu=0.4)
    if arg.startswith("smoke"):  # the same family (CLIP extras, class token, scan + remat), tiny
        common.smoke(c, image_size=28, patch_size=7,
                     model=dict(width=32, depth=2, mlp_dim=128, num_heads=2, pool_type="tok", pre_norm=True,
                                cls_posemb=True, act="quick_gelu", ln_eps=1e-5, patch_bias=False, scan=True,
                                remat_policy="nothing_saveable"))
    return c
