"""PyTorch eager fp32 benchmark of one MaskEmbed training step, for comparison with `python -m lalign.bench`.

It mirrors what the original PyTorch implementation (iancovert/locality-alignment) does per step, written
independently with timm's ViT:
  1. masks (B, 3, N): a patch mask m of uniform-random size k ~ U{0..N}, its complement 1-m, and all-ones;
  2. teacher (frozen timm ViT, torch.no_grad) on the B*3 masked images (dropped patches' pixels set to 0),
     truncated to its target blocks and followed by its final norm; targets divided by a constant std (1.0);
  3. student (trainable copy of the teacher, no pooling head): forward_features once on the B unmasked images,
     then a Linear D->D;
  4. student tokens multiplied by each of the 3 token masks -> (B*3, T, D);
  5. decoder: learned position embedding, 2 timm Blocks (width D, MLP ratio 4, LayerScale 1e-6), LayerNorm,
     Linear D->D;
  6. MSE against the targets, backward, AdamW(lr 3e-4, wd 0.01) step, zero_grad.

    python scripts/bench_torch_reference.py --model demo             # the demo's ViT (48px, patch 8, width 64)
    python scripts/bench_torch_reference.py --model b16 --steps 3    # SigLIP ViT-B/16 at 224, penultimate target
    python scripts/bench_torch_reference.py --model b16 --batch 256 --device cuda --bf16   # on a GPU, bf16 autocast

Prints one JSON line: images/s and step time (median, min), the analytic FLOPs per image of lalign/bench.py,
achieved GFLOP/s, the measured float32 matmul peak of this CPU and the MFU. A benchmark only: the library does
not use it. Weights are random (pretrained=False): the step's cost does not depend on them. Like lalign.bench it
runs with tcmalloc where installed (lalign/allocator.py; eager PyTorch gains from it too on small models).
"""
import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time

from lalign import allocator  # the same allocator as lalign.bench: it changes CPU step times

if __name__ == "__main__":  # before importing torch and timm (seconds), which the re-run would import again
    allocator.use_tcmalloc()  # LALIGN_TCMALLOC=0 keeps the system allocator, as for lalign.bench

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if importlib.util.find_spec("torchvision") is None:  # timm imports torchvision; its ViTs never use it
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "shims"))
import timm  # noqa: E402
from timm.models.vision_transformer import Block, VisionTransformer  # noqa: E402

NUM_MASKS = 3


def build_teacher(name: str) -> tuple[nn.Module, str, str]:
    """-> (ViT, architecture, target layer). b16: SigLIP B/16 (MAP head, no class token); demo: our demo's."""
    if name == "demo":
        vit = VisionTransformer(img_size=48, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4,
                                num_classes=0, class_token=False, global_pool="map")
        return vit, "VisionTransformer(48px, patch 8, width 64, depth 4, MAP)", "last"  # configs/demo.py's target
    arch = "vit_base_patch16_siglip_224" if timm.is_model("vit_base_patch16_siglip_224") else "vit_base_patch16_224"
    return timm.create_model(arch, pretrained=False, num_classes=0), arch, "penultimate"  # the paper's default


def block_flops(t: int, d: int, f: int) -> float:
    """lalign/cost_model.py's block model: q, k, v, out projections + attention logits and mixing + MLP (MAC = 2)."""
    return 8 * t * d**2 + 4 * t**2 * d + 4 * t * d * f


def flops_per_image(n: int, prefix: int, patch: int, d: int, f: int, depth: int, target_blocks: int) -> dict:
    """lalign/cost_model.py's maskembed_flops_per_image: teacher forward on M masked copies, student forward+backward
    (3x, no input gradient for the patch embedding), projection 3x, decoder 3x on M copies."""
    t, embed = n + prefix, 2 * n * patch * patch * 3 * d
    parts = {"teacher": NUM_MASKS * (embed + target_blocks * block_flops(t, d, f)),
             "student": 3 * (embed + depth * block_flops(t, d, f)) - 2 * embed,
             "projection": 3 * 2 * t * d * d,
             "decoder": NUM_MASKS * 3 * (2 * block_flops(t, d, 4 * d) + 2 * t * d * d)}
    return {**parts, "total": sum(parts.values())}


class Decoder(nn.Module):
    def __init__(self, tokens: int, d: int, heads: int, depth: int = 2):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads, mlp_ratio=4, qkv_bias=True, init_values=1e-6)
                                      for _ in range(depth)])
        self.norm, self.out = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return self.out(self.norm(self.blocks(x + self.pos)))


def sample_masks(b: int, n: int, device="cpu") -> torch.Tensor:
    """(B, 3, N) float: [m, 1 - m, ones] with |m| ~ Uniform{0..N}, a uniformly random subset."""
    k = torch.randint(0, n + 1, (b, 1), device=device)
    m = (torch.rand(b, n, device=device).argsort(dim=-1) < k).float()
    return torch.stack([m, 1 - m, torch.ones_like(m)], dim=1)


def pixel_masks(masks: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """(B, 3, N) -> (B*3, 1, grid*patch, grid*patch)."""
    m = masks.reshape(-1, 1, grid, grid)
    return m.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Float32 matmul throughput, best of `repeats` (as lalign/bench.py measures the CPU's practical peak)."""
    a = torch.randn(n, n)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("b16", "demo"), default="b16")
    p.add_argument("--batch", type=int, default=None, help="default: 8 for b16, 32 for demo")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="default: torch's")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as lalign's bf16 compute), on cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch or (8 if args.model == "b16" else 32)

    teacher, arch, target_layer = build_teacher(args.model)
    student = copy.deepcopy(teacher).train()
    student.attn_pool = None  # no pooling head (num_classes=0 already made the classifier an Identity)
    depth = len(teacher.blocks)
    target_blocks = depth - 1 if target_layer == "penultimate" else depth
    teacher.blocks = teacher.blocks[:target_blocks]  # forward_features: blocks[:k] then the final norm
    teacher.eval().requires_grad_(False)

    size, patch = teacher.patch_embed.img_size[0], teacher.patch_embed.patch_size[0]
    grid, prefix, d = size // patch, teacher.num_prefix_tokens, teacher.embed_dim
    n, heads, f = grid * grid, teacher.blocks[0].attn.num_heads, teacher.blocks[0].mlp.fc1.out_features
    proj, decoder = nn.Linear(d, d), Decoder(n + prefix, d, heads)
    for module in (teacher, student, proj, decoder):
        module.to(device)
    params = [*student.parameters(), *proj.parameters(), *decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    images, target_std = torch.randn(b, 3, size, size, device=device), 1.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        masks = sample_masks(b, n, device)
        with autocast:
            with torch.no_grad():
                masked = images.repeat_interleave(NUM_MASKS, dim=0) * pixel_masks(masks, grid, patch)
                targets = teacher.forward_features(masked) / target_std  # (B*3, T, D)
            tokens = proj(student.forward_features(images))  # (B, T, D)
            token_masks = F.pad(masks, (prefix, 0))  # prefix tokens always masked, as lalign does
            masked_tokens = (tokens[:, None] * token_masks[..., None]).flatten(0, 1)  # (B*3, T, D)
            loss = F.mse_loss(decoder(masked_tokens).float(), targets.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)

    fl = flops_per_image(n, prefix, patch, d, f, depth, target_blocks)
    step_s = statistics.median(times)
    achieved = fl["total"] * b / step_s / 1e9
    if device.type == "cuda":  # the data sheet's dense bf16 peak, as lalign.bench reports it
        name = torch.cuda.get_device_name()
        peak = next((v * 1e3 for k, v in {"H100": 989.0, "H200": 989.0, "A100": 312.0}.items() if k in name),
                    float("nan"))
    else:
        peak = peak_gflops()
    print(json.dumps({
        "model": args.model, "arch": arch, "target_layer": target_layer,
        "batch_size": b, "images_per_s": b / step_s, "step_s": step_s, "step_s_min": min(times),
        "torch_version": torch.__version__, "num_threads": torch.get_num_threads(), "device": str(device),
        "bf16": args.bf16,
        "flops_per_image": fl["total"], "flops_per_image_parts": fl, "achieved_gflops_per_s": achieved,
        "peak_gflops_per_s": peak, "mfu": achieved / peak, "loss": loss, "allocator": allocator.describe()}))


if __name__ == "__main__":
    main()
