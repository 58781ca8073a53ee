"""What a MaskEmbed step costs, analytically: its model FLOPs per image, the activation bytes autodiff keeps of one
transformer block, and what the chips offer (peak bf16 TFLOP/s, HBM). `lalign.bench` (MFU), `lalign.memory`
(per-device bytes, runtime estimates) and the probe's memory line (lalign/probe/heads.py) read it.

FLOP model (multiply-add = 2 FLOPs; norms, softmax, activations and the optimizer are not counted), per image,
for T tokens of width D, MLP width F, N patches of P pixels, M masks:
    block(T, D, F)  = 8 T D^2 (q, k, v, out) + 4 T^2 D (logits, weights x values) + 4 T D F (MLP)
    vit(depth)      = 2 N P*3 D (patch embedding) + depth * block
    teacher         = M * vit(target blocks)                          forward only, no gradient tape
    student         = 3 * vit(depth) - 2 N P*3 D                      forward + backward (no input gradient)
    projection      = 3 * 2 T D_s D_t
    decoder         = M * 3 * (depth_dec * block(T, D_t, 4 D_t) + 2 T D_t^2)
For ViT-B/16 at 224 (penultimate target, 3 masks) this gives 255.4 GFLOP per image: teacher 38%, student 41%,
decoder 21%.

Activation bytes of one pre-LN block (`block_saved`): lalign/memory.py's docstring.
"""
from __future__ import annotations

from lalign.maskembed import num_masks, patch_grid, target_num_blocks

# Peak dense bf16 TFLOP/s per chip, from the vendors' data sheets.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0,
               "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0}
# HBM per chip, GiB.
HBM_GIB = {"TPU v4": 32, "TPU v5e": 16, "TPU v5 lite": 16, "TPU v5p": 95, "TPU v6 lite": 32, "NVIDIA H100": 80,
           "NVIDIA H200": 141, "NVIDIA A100": 80}


def block_flops(tokens: int, width: int, mlp_dim: int) -> float:
    return 8 * tokens * width**2 + 4 * tokens**2 * width + 4 * tokens * width * mlp_dim


def maskembed_flops_per_image(teacher, image_size: int, cfg, decoder_depth: int) -> dict[str, float]:
    """The analytic model of the module docstring; returns the parts and their total."""

    gh, gw = patch_grid((image_size, image_size), teacher.patch_size)
    n = gh * gw
    t = n + teacher.num_prefix_tokens
    d, f = teacher.width, teacher.mlp_dim or 4 * teacher.width
    embed = 2 * n * teacher.patch_size[0] * teacher.patch_size[1] * 3 * d
    m = num_masks(cfg)
    k = target_num_blocks(teacher.depth, cfg.target_layer)
    parts = {
        "teacher": m * (embed + k * block_flops(t, d, f)),
        "student": 3 * (embed + teacher.depth * block_flops(t, d, f)) - 2 * embed,
        "projection": 3 * 2 * t * d * d,
        "decoder": m * 3 * (decoder_depth * block_flops(t, d, 4 * d) + 2 * t * d * d),
    }
    parts["total"] = sum(parts.values())
    return parts


def block_saved(t, d, f, h, b, tp):
    """Bytes autodiff keeps of one pre-LN block for T=t tokens of width d, MLP width f, h heads, b bytes per value,
    tensor parallelism tp (lalign/memory.py's docstring derives it)."""
    return b * t * (4 * d + (4 * d + 2 * f) / tp) + h / tp * t * t * (4 + b)
