"""lalign's MaskEmbed step beside the reference implementation's own code, on the same weights, images and masks.

    git clone https://github.com/iancovert/locality-alignment /tmp/ref     # or `git archive` of a mirror
    PYTHONPATH=/path/to/timm-1.0.8 python scripts/reference_parity.py --ref /tmp/ref

The reference (iancovert/locality-alignment) was written against timm 1.0.8: install it (`pip install
timm==1.0.8` in a separate environment) or put an unpacked 1.0.8 wheel first on PYTHONPATH; the script says which
timm it ran with and refuses another unless `--allow-timm-version`. torchvision is not needed (where it is
missing, the tests' stand-in answers timm's imports of it). Float32 on CPU on both sides; 1-2.5 minutes on 2
shared CPU cores, mostly imports and XLA compilation. Not part of CI: it needs the reference's source.

What it does:

1. Builds the reference's teacher, student, decoder, optimizer and mask sampler with the reference's own code,
   step by step as its scripts/train.py `main()` does, with the arguments of its configs/clip-vit-b.yaml
   (AdamW, lr 3e-4, weight decay 0.01, betas (0.9, 0.95), gradient clip 1.0) except: a tiny SigLIP-style model
   through the same factories (teacher `vit_base_patch16_siglip_224`, student `svit_base_patch16_siglip_224`,
   i.e. with its attention soft-cap, both with `--model-kwargs` img_size=32 patch_size=8 embed_dim=48 depth=3
   num_heads=4), float32 instead of bf16 autocast, eager instead of torch.compile. Hub weights are replaced by
   random ones (every tensor moved off its init, q/k scaled so that the student's soft-cap acts), loaded into
   both teacher and student as `pretrained=True` would load the same checkpoint into both.
2. Converts the same weights into lalign (`lalign.checkpoints.timm`), builds lalign's MaskEmbed model and
   optimizer from configs/common.py's recipe (`maskembed.attn_softcap=30.0`, float32) and checks that lalign's
   student initialization (teacher copy, fresh final norm, zero projection) equals the reference's.
3. Draws one batch of masks (lalign's sampler; the layout [m, 1-m, ones] per image is the reference sampler's)
   and gives both the same images and masks: the student's tokens, the teacher targets, the target std (the
   reference's
   `get_baseline_loss` vs lalign's `estimate_target_stats`), then one training step, the reference's own
   `train_one_epoch` on a one-batch loader against lalign's loss, gradient and optimizer update. The student's
   output projection starts at zero on both sides, which makes every encoder gradient exactly zero at the first
   step; it is given the same small random weights on both sides first, so that every gradient is compared.
4. Splits the optimizer update by timm's weight-decay groups: the reference hands `create_optimizer_v2` an
   iterator of parameters, so timm 1.0.8 builds no groups and AdamW decays every parameter; the parameters that
   timm's groups would exempt (1-D: biases, LayerNorm, LayerScale) and the rest are shown apart. On each, the
   fit of (lalign update - reference update) against -lr*wd*p: 0 where both decay alike, -1 where lalign does not
   decay. For each `optimizer.weight_decay_on` option the expected fit follows from which of the group's
   parameters the option decays.

Where the two differ by construction, lalign is set to the reference's behaviour for the comparison, and what
each difference changes on this batch is printed: the decoder's LayerNorm eps (the reference's decoder norms are
torch's default 1e-5, as lalign's `maskembed.decoder_ln_eps`; the row shows what the teacher's eps would
change), the student's final LayerNorm eps (the reference re-creates it as `type(model.norm)(embed_dim)`, so
1e-5; lalign keeps the teacher's eps and has no setting for it, so the reference's is set to lalign's instead),
and the attention soft-cap (lalign's default is none).

Output: a header (timm, torch and jax versions, the model, the reference's optimizer and eps values, the masks),
then four tables, abridged here (timm 1.0.8, torch 2.13, jax 0.10.2; the numbers vary in the last digits
across CPUs):

    Forward: max |lalign - reference|, and relative to the largest |reference|
      student tokens (soft-capped student, forward_features)     3.62  1.19e-06  3.29e-07
      teacher targets / std                                      3.65  3.58e-06  9.79e-07
      loss (train_one_epoch | lalign's masked loss)              1.37  1.19e-07  8.72e-08
    Gradients before clipping, by name (96 lalign tensors = 76 reference tensors; ...)
      student/Transformer/encoderblock_2   16   0.0128  4.66e-09  3.64e-07  MultiHeadDotProductAttention_0/out/bias
      ...                                  (one row per block / module; relative <= 1e-6)
    One AdamW update (lr 0.0003, wd 0.01): ...       tensors   max |diff|  / lr    fit     expected
      all          timm no-decay (1-D)               51 / 61   6.16e-07    0.002   0.0083  0
      all          the rest                          25 / 35   7.18e-07    0.0024  0.0066  0
      timm_groups  timm no-decay (1-D)               51 / 61   3.44e-06    0.0115  -0.992  -1
      ...
    Differences in defaults, on this batch            loss      gradients
      decoder LayerNorm eps        1e-05  1e-06       0.00207   0.032
      student final LayerNorm eps  1e-05  1e-06       1.74e-07  6.05e-06
      attention soft-cap           30     None        3.14e-06  0.0335

The last line is `PASS` or `FAIL: ...`. Exit status 1 on FAIL: the default `weight_decay_on="all"` must agree
within TOLERANCES below, and every option must show its expected decay fit; 2 on a usage error.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_TIMM = "1.0.8"
REF_CONFIG = "configs/clip-vit-b.yaml"  # the reference's ViT-B recipe: its optimizer arguments are the ones used
TEACHER, STUDENT = "vit_base_patch16_siglip_224", "svit_base_patch16_siglip_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4)
BATCH = 4
QK_GAIN = 6.0  # q and k weights scaled by this: the soft-cap changes ~29% of the student's attention logits by >1%
PROJ_STD = 0.02  # the random weights given to the student's output projection (timm's Linear init scale)
RULES = ("all", "timm_groups", "kernels")
# Relative to the largest reference value of each quantity. float32 in two libraries (XLA and torch kernels, other
# summation orders) agrees to 1e-6 here (targets 1e-6, gradients <= 8e-7, loss 1e-7); the decoder's eps and the
# soft-cap, the differences a faithful run must not have, move the gradients by 3% and the loss by up to 2e-3.
# 1e-4 is 100x above the rounding and far below those. (The student's final-norm eps moves the gradients by only
# 6e-6, below any tolerance that float32 allows: it is matched explicitly instead.) The decay fit is a slope in
# [-1, 0] and reads 0.007-0.008 where both decay alike (the update's own rounding, projected on -lr*wd*p): 0.05
# tells "decays alike" from "does not decay" (-1) with room on both sides.
TOLERANCES = dict(targets=1e-4, std=1e-4, loss=1e-4, gradients=1e-4, fit=0.05)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ref", required=True, help="a checkout of iancovert/locality-alignment")
    p.add_argument("--weight-decay-on", choices=RULES + ("every",), default="every",
                   help="lalign optimizer.weight_decay_on option(s) to compare ('every': all three)")
    p.add_argument("--all-tensors", action="store_true", help="one gradient row per tensor, not per model part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-timm-version", action="store_true", help=f"run with a timm other than {REF_TIMM}")
    return p.parse_args(argv)


def usage_error(message: str) -> None:
    print(f"reference_parity.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ------------------------------------------------------------------------------------------- the reference
def import_reference(ref: str):
    """The reference's scripts/train.py as a module (its `main()` is not run), with its package importable."""
    train_py = os.path.join(ref, "scripts", "train.py")
    if not os.path.isfile(os.path.join(ref, "locality_alignment", "model_utils.py")) or not os.path.isfile(train_py):
        usage_error(f"--ref {ref}: not a checkout of iancovert/locality-alignment (expected scripts/train.py and "
                    f"locality_alignment/model_utils.py in it)")
    if importlib.util.find_spec("torchvision") is None:  # timm imports it at load time; its ViTs never use it
        sys.path.insert(0, os.path.join(ROOT, "tests", "shims"))
    sys.path.insert(0, os.path.abspath(ref))
    spec = importlib.util.spec_from_file_location("reference_train", train_py)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train


def reference_args(train, ref: str) -> argparse.Namespace:
    """train.py's arguments as its config file sets them (`_parse_args`), with the tiny model in place of the hub's."""
    import yaml

    with open(os.path.join(ref, REF_CONFIG)) as f:
        cfg = yaml.safe_load(f)
    cfg.update(teacher_model=TEACHER, student_model=STUDENT, teacher_pretrained=False, student_pretrained=False,
               model_kwargs=dict(TINY), batch_size=BATCH, amp=False, torchcompile=None)
    train.parser.set_defaults(**cfg)
    args = train.parser.parse_args([])
    # What main() and timm's init_distributed_device set for one process on one device.
    args.prefetcher, args.distributed, args.world_size, args.rank = not args.no_prefetcher, False, 1, 0
    return args


class OneBatch(list):
    """A loader of one batch that reports two: train_one_epoch's progress log divides by (batches - 1)."""

    def __len__(self):
        return 2


class FixedMasks:
    """A mask sampler that answers every call with one fixed draw (the reference's samplers take (batch, seed))."""

    def __init__(self, masks):
        self.masks = masks

    def __call__(self, batch_size: int, seed=None):
        assert len(self.masks) % batch_size == 0
        return self.masks.clone()


def randomize_(model, gen, qk_gain: float) -> None:
    """Stand-in for hub weights: every tensor moved off its init (biases and norms too, so that a wrong mapping
    shows), and q/k scaled so that the soft-cap acts on a good share of the attention logits."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim] *= qk_gain


def build_reference(train, args, seed: int) -> dict:
    """The reference's models, optimizer and sampler, in the order and with the calls of train.py main()."""
    import torch

    from timm import utils
    from timm.models import create_model
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    utils.random_seed(args.seed, args.rank)
    in_chans = 3
    teacher = create_model(args.teacher_model, pretrained=args.teacher_pretrained, in_chans=in_chans, num_classes=0,
                           scriptable=args.torchscript, **args.model_kwargs, **args.teacher_model_kwargs)
    randomize_(teacher, torch.Generator().manual_seed(seed), QK_GAIN)
    hub = {k: v.detach().clone() for k, v in teacher.state_dict().items()}  # the "pretrained" checkpoint
    teacher_patch_size = teacher.patch_embed.patch_size[0]
    teacher = train.convert_to_teacher_model(teacher, skip_blocks=args.skip_blocks, prefix_only=args.prefix_only)
    teacher.eval()
    num_patches = teacher.patch_embed.num_patches

    encoder = create_model(args.student_model, pretrained=args.student_pretrained, in_chans=in_chans, num_classes=0,
                           drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
                           scriptable=args.torchscript, checkpoint_path=args.student_checkpoint,
                           **args.model_kwargs, **args.student_model_kwargs)
    encoder.load_state_dict(hub)  # pretrained=True loads the teacher's checkpoint into the student too
    assert encoder.patch_embed.patch_size[0] == teacher_patch_size
    if args.decoder_width is None:
        args.decoder_width = teacher.embed_dim
    encoder = train.convert_to_student_model(encoder, output_dim=args.decoder_width, output_head=args.student_head)
    if args.decoder_num_heads is None:
        args.decoder_num_heads = encoder.blocks[0].attn.num_heads
    if args.decoder_qk_norm is None:
        args.decoder_qk_norm = not isinstance(encoder.blocks[0].attn.q_norm, torch.nn.Identity)
    if args.decoder_qkv_bias is None:
        args.decoder_qkv_bias = encoder.blocks[0].attn.qkv.bias is not None
    decoder = train.MaskEmbedDecoder(
        embed_dim=args.decoder_width, num_heads=args.decoder_num_heads, num_patch_tokens=num_patches,
        num_prefix_tokens=teacher.num_prefix_tokens, output_size=teacher.embed_dim, num_layers=args.decoder_layers,
        prefix_only=args.prefix_only, qkv_bias=args.decoder_qkv_bias, qk_norm=args.decoder_qk_norm,
        init_values=args.decoder_init_values, norm_layer=type(encoder.norm), act_layer=type(encoder.blocks[0].mlp.act),
        mlp_layer=type(encoder.blocks[0].mlp))
    student = train.MaskEmbedStudent(encoder, decoder)
    optimizer = create_optimizer_v2(filter(lambda p: p.requires_grad, student.parameters()),
                                    **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    mask_sampler = train.UniformMaskSampler(mask_size=num_patches, antithetical_sampling=args.antithetical_sampling,
                                            include_null=args.include_null_mask)
    return dict(teacher=teacher, student=student, optimizer=optimizer, mask_sampler=mask_sampler,
                hub={k: v.numpy() for k, v in hub.items()})


def timm_no_decay_names(student) -> set[str]:
    """The parameters timm's own groups exempt from weight decay (what create_optimizer_v2 builds when handed the
    module): 1-D tensors and biases (the student has no no_weight_decay())."""
    from timm.optim.optim_factory import param_groups_weight_decay

    no_decay = {id(p) for p in param_groups_weight_decay(student, 0.01)[0]["params"]}
    return {n for n, p in student.named_parameters() if id(p) in no_decay}


def reference_step(train, ref: dict, args, images, masks) -> dict:
    """One update by the reference's own train_one_epoch on a one-batch loader; the gradients are recorded as
    backward leaves them (before clipping)."""
    import torch

    student = ref["student"]
    params = dict(student.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.detach().clone()))
             for n, p in params.items()]
    try:
        loader = OneBatch([(images, torch.zeros(len(images)))])
        metrics = train.train_one_epoch(0, student, ref["teacher"], args.loss_function, loader, ref["optimizer"],
                                        FixedMasks(masks), args, device=torch.device("cpu"))
    finally:
        for h in hooks:
            h.remove()
    update = {n: (p.detach() - before[n]).numpy() for n, p in params.items()}
    return dict(loss=metrics["loss"], grads={n: g.numpy() for n, g in grads.items()}, update=update,
                before={n: t.numpy() for n, t in before.items()})


def reference_loss_and_grads(student, teacher, images, masks) -> tuple[float, dict]:
    """The reference's MSE (train_one_epoch's _forward) and its gradients, without a step: for its quirks."""
    import torch

    with torch.no_grad():
        targets = teacher(images.repeat_interleave(len(masks) // len(images), 0), masks)
    student.zero_grad()
    loss = torch.nn.functional.mse_loss(student(images, masks), targets)
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.detach().clone().numpy() for n, p in student.named_parameters()}
    student.zero_grad()
    return loss.item(), grads


def attention_logits(student, images) -> np.ndarray:
    """The reference student's attention logits (before its soft-cap), all blocks: how much the cap acts."""
    import torch

    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0]))) for b in student.encoder.blocks]
    with torch.no_grad():
        student.encoder(images)
        out = []
        for attn, x in inputs:
            b, t, c = x.shape
            qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            out.append(((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).flatten().numpy())
    for h in hooks:
        h.remove()
    return np.concatenate(out)


# -------------------------------------------------------------------------------------------------- lalign
def decoder_table():
    """The reference decoder's names (timm Blocks, pos_embed, norm, head) for lalign's TokenHead: the timm ViT
    table's block rules without the `Transformer/` level."""
    from lalign.checkpoints import mapping as m
    from lalign.checkpoints import timm as timm_ckpt

    blocks = [m.Rule(tuple(k.replace("Transformer/", "", 1) for k in r.ours), r.theirs, r.kind)
              for r in timm_ckpt.TABLE if r.theirs.startswith("blocks.")]
    return [m.Rule("pos_embedding", "pos_embed"), *blocks, *m.layernorm("final_norm", "norm"), *m.dense("head", "head")]


def to_lalign(named: dict, model, like: dict) -> dict:
    """Reference student tensors by name (parameters, gradients or updates) -> lalign's params tree
    {'student', 'proj', 'decoder'}, through lalign's timm conversion table (layout changes only)."""
    from lalign.checkpoints import common, mapping as m
    from lalign.checkpoints import timm as timm_ckpt

    enc = {k[len("encoder."):]: v for k, v in named.items()
           if k.startswith("encoder.") and not k.startswith("encoder.head.")}  # head: lalign's separate 'proj'
    student = timm_ckpt.from_timm_state_dict(enc, model.student, "reference encoder", image_size=TINY["img_size"])
    linear_back = m.KINDS["linear"][1]
    proj = {"kernel": linear_back(named["encoder.head.weight"], None), "bias": named["encoder.head.bias"]}
    dec = {k: v for k, v in named.items() if k.startswith("decoder.")}
    flat = m.import_params(dec, decoder_table(), like["decoder"], model.decoder.depth, "reference decoder",
                           "lalign's decoder", prefix="decoder.")
    return {"student": student, "proj": proj, "decoder": common.unflatten(flat)}


def lalign_config(lr: float, rule: str):
    """configs/common.py's recipe at the tiny model's size, compared in float32 with the reference's soft-cap."""
    from lalign.configs import common

    c = common.maskembed_imagenet21k(image_size=TINY["img_size"], normalization="siglip", lr=lr, model={})
    c.maskembed.attn_softcap = 30.0  # the reference's svit students
    c.maskembed.teacher_dtype = c.maskembed.student_dtype = "float32"  # bf16 by default; the reference here: fp32
    c.optimizer.weight_decay_on = rule
    return c


class Lalign:
    """lalign's teacher, MaskEmbed model, loss and optimizer for one config, as lalign/train.py builds them."""

    def __init__(self, config, teacher_vit, teacher_params, decoder_eps=None, softcap="config"):
        import jax.numpy as jnp

        from lalign import maskembed
        from lalign import optim as lalign_optim

        cfg = config.maskembed
        self.config = config
        self.teacher, self.teacher_params = maskembed.Teacher.create(teacher_vit, teacher_params, cfg.target_layer,
                                                                     dtype=jnp.dtype(cfg.teacher_dtype))
        model = maskembed.make_maskembed_model(teacher_vit, cfg)
        if decoder_eps is not None:  # what maskembed.decoder_ln_eps sets, replaced on the module
            model = model.clone(decoder=model.decoder.clone(ln_eps=decoder_eps))
        if softcap != "config":
            model = model.clone(student=model.student.clone(attn_softcap=softcap))
        self.model = model
        self.loss = maskembed.make_masked_loss_fn(model, self.teacher, cfg)
        self.tx, _ = lalign_optim.make_optimizer(config.optimizer, config.total_steps)

    def init(self, teacher_params, key, images):
        from lalign import maskembed

        return maskembed.init_from_teacher(self.model, teacher_params, key, images,
                                           maskembed.num_masks(self.config.maskembed))

    def step(self, params, images, masks, target_std, key):
        """(loss, gradients, update) of one step, as lalign/train.py's train_step computes them."""
        import jax

        (loss, _), grads = jax.value_and_grad(self.loss, has_aux=True)(params, self.teacher_params, images, masks,
                                                                        key, target_std, True)
        updates, _ = self.tx.update(grads, self.tx.init(params), params)
        return float(loss), flat_np(grads), flat_np(updates)


# ----------------------------------------------------------------------------------------------- comparing
def flat_np(tree) -> dict:
    from lalign.checkpoints import common

    return {k: np.asarray(v, np.float64) for k, v in common.flatten(tree).items()}


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def part_of(key: str) -> str:
    """A gradient table row: the block or module a parameter belongs to."""
    parts = key.split("/")
    if parts[0] == "student" and parts[1] == "Transformer":
        return "/".join(parts[:3])
    if parts[0] in ("student", "decoder") and len(parts) > 2:
        return "/".join(parts[:2])
    return "/".join(parts[:-1]) if len(parts) > 1 else key


def gradient_rows(ours: dict, theirs: dict, per_tensor: bool) -> list[tuple]:
    """(part, tensors, max |reference grad|, max |diff|, max |diff| / max |grad|, worst tensor) per part of the
    model (or per tensor)."""
    rows: dict[str, list] = {}
    for k in ours:
        name = k if per_tensor else part_of(k)
        r = rows.setdefault(name, [name, 0, 0.0, 0.0, ""])
        diff = max_diff(ours[k], theirs[k])
        r[1] += 1
        r[2] = max(r[2], float(np.max(np.abs(theirs[k]))))
        if diff > r[3] or not r[4]:
            r[3], r[4] = diff, (k[len(name) + 1:] or k.rsplit("/", 1)[-1]) if diff else "-"
    return [(n, t, g, d, d / g if g else (0.0 if d == 0 else float("inf")), w) for n, t, g, d, w in rows.values()]


def decay_fit(ours: dict, theirs: dict, params: dict, keys: list[str], lr: float, wd: float) -> tuple[float, float]:
    """(least-squares slope of (lalign - reference) update against -lr*wd*p, max |lalign - reference|) on `keys`."""
    x = np.concatenate([-lr * wd * params[k].ravel() for k in keys])
    y = np.concatenate([(ours[k] - theirs[k]).ravel() for k in keys])
    return float(x @ y / (x @ x)), float(np.max(np.abs(y)))


def expected_fit(params: dict, keys: list[str], decayed: dict) -> float:
    """The fit when lalign decays exactly the parameters its rule marks and the reference decays every one."""
    total = sum(float(np.sum(params[k] ** 2)) for k in keys)
    return -sum(float(np.sum(params[k] ** 2)) for k in keys if not decayed[k]) / total


def table(title: str, header: tuple, rows: list[tuple]) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(_fmt(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(c) -> str:
    if isinstance(c, float):
        return "0" if c == 0 else (f"{c:.3g}" if 1e-3 <= abs(c) < 1e4 else f"{c:.2e}")
    return str(c)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    opts = parse_args(argv)
    ref_dir = os.path.abspath(opts.ref)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)  # lalign and configs/
    train = import_reference(ref_dir)

    import jax
    import jax.numpy as jnp
    import timm
    import torch

    if timm.__version__ != REF_TIMM and not opts.allow_timm_version:
        usage_error(f"the reference runs on timm {REF_TIMM}, this is timm {timm.__version__} "
                    f"({os.path.dirname(timm.__file__)}): put timm {REF_TIMM} first on PYTHONPATH, or pass "
                    f"--allow-timm-version")
    jax.config.update("jax_default_matmul_precision", "highest")
    from lalign import maskembed
    from lalign.checkpoints import timm as timm_ckpt
    from lalign.optim import DECAYED, weight_decay_mask

    rules = RULES if opts.weight_decay_on == "every" else (opts.weight_decay_on,)
    failures = []

    def check(what: str, value: float, tolerance: float, expected: float = 0.0) -> None:
        if not abs(value - expected) <= tolerance:
            failures.append(f"{what}: {value:.3g}, expected {expected:.3g} within {tolerance}")

    # --- The reference, as train.py builds it; lalign from the same weights.
    args = reference_args(train, ref_dir)
    ref = build_reference(train, args, opts.seed)
    student, teacher = ref["student"], ref["teacher"]
    groups = ref["optimizer"].param_groups
    print(f"reference: {ref_dir} (scripts/train.py main() with {REF_CONFIG}); timm {timm.__version__} "
          f"({os.path.dirname(timm.__file__)}); torch {torch.__version__}; jax {jax.__version__}; float32, CPU")
    print(f"model: teacher {TEACHER}, student {STUDENT}, {TINY}; batch {BATCH}; target: block "
          f"{len(teacher.blocks)} of {TINY['depth']} (skip_blocks {args.skip_blocks}) + final norm")
    print(f"reference optimizer: {type(ref['optimizer']).__name__}, {len(groups)} parameter group(s), weight_decay "
          f"{[g['weight_decay'] for g in groups]} on {sum(len(g['params']) for g in groups)} tensors, lr "
          f"{groups[0]['lr']}, betas {groups[0]['betas']}, eps {groups[0]['eps']}, clip_grad {args.clip_grad} "
          f"({args.clip_mode})")

    hub = ref["hub"]
    teacher_vit = timm_ckpt.model_from_timm_state_dict(hub, num_heads=TINY["num_heads"], ln_eps=teacher.norm.eps)
    teacher_params = timm_ckpt.from_timm_state_dict(hub, teacher_vit, "reference teacher")
    decoder_eps = student.decoder.norm.eps
    assert all(m.eps == decoder_eps for m in student.decoder.modules() if isinstance(m, torch.nn.LayerNorm))
    student_norm_eps = student.encoder.norm.eps
    student.encoder.norm.eps = teacher_vit.ln_eps

    configs = {rule: lalign_config(args.lr, rule) for rule in rules}
    print(f"LayerNorm eps: teacher {teacher.norm.eps}; reference decoder {decoder_eps} (lalign's "
          f"maskembed.decoder_ln_eps: {configs[rules[0]].maskembed.decoder_ln_eps}); reference student final norm "
          f"{student_norm_eps} (lalign's: the teacher's, no setting: the reference's is set to {teacher_vit.ln_eps} "
          f"here)")
    ours = {rule: Lalign(c, teacher_vit, teacher_params, decoder_eps=decoder_eps) for rule, c in configs.items()}
    first = ours[rules[0]]
    cfg = first.config.maskembed

    # --- The same images and masks for both.
    rng = np.random.default_rng(opts.seed)
    images_nhwc = jnp.asarray(rng.standard_normal((BATCH, TINY["img_size"], TINY["img_size"], 3)), jnp.float32)
    images = torch.from_numpy(np.asarray(images_nhwc).transpose(0, 3, 1, 2).copy())
    std_key, init_key, step_key = jax.random.split(jax.random.key(opts.seed), 3)
    grid = (TINY["img_size"] // TINY["patch_size"],) * 2
    # estimate_target_stats draws exactly these masks for its batch 0: both std estimates see the same images.
    masks = maskembed.sample_masks(jax.random.fold_in(std_key, 0), BATCH, grid, cfg)
    masks_t = torch.from_numpy(np.asarray(masks, np.float32).reshape(-1, grid[0] * grid[1]))
    drawn = ref["mask_sampler"](BATCH, seed=0)
    layout = all(bool((m[1::3] == 1 - m[0::3]).all() and (m[2::3] == 1).all()) for m in (masks_t, drawn))
    print(f"masks: {tuple(masks.shape)} (image, [m, 1-m, ones], patch), patches kept per m "
          f"{np.asarray(masks[:, 0].sum(-1)).tolist()}; the reference sampler's layout: {layout}")

    # --- Student initialization: lalign's own equals the reference's (the decoder is random on both sides).
    init = first.init(teacher_params, init_key, images_nhwc)
    convert = functools.partial(to_lalign, model=first.model, like=init)
    init_ours, init_ref = flat_np(init), flat_np(convert(named_tensors(student)))
    kept = [k for k in init_ours if not k.startswith("decoder/")]
    with torch.no_grad():  # see the module docstring, step 3
        gen = torch.Generator().manual_seed(opts.seed + 1)
        for p in student.encoder.head.parameters():
            p.copy_(PROJ_STD * torch.randn(p.shape, generator=gen))
    params = jax.tree.map(jnp.asarray, convert(named_tensors(student)))

    # --- Forward: student tokens, teacher targets, their std.
    with torch.no_grad():
        tokens_ref = student.encoder.forward_features(images).numpy()
        raw_ref = teacher(images.repeat_interleave(3, 0), masks_t).numpy()
    tokens_ours = np.asarray(first.model.features(params, images_nhwc))
    raw_ours = np.asarray(first.teacher(first.teacher_params, images_nhwc, masks)).reshape(raw_ref.shape)
    baseline = train.get_baseline_loss(teacher, [(images, torch.zeros(BATCH))], FixedMasks(masks_t), args,
                                       device=torch.device("cpu"))["baseline_loss"]
    teacher.output_scaling.scale *= 1 / baseline ** 0.5  # as train.py: teacher outputs scaled to unit variance
    std_ref = baseline ** 0.5
    std_ours = maskembed.estimate_target_stats(first.teacher, first.teacher_params, [images_nhwc], std_key, cfg)["std"]
    with torch.no_grad():
        targets_ref = teacher(images.repeat_interleave(3, 0), masks_t).numpy()
    targets_ours = np.asarray(maskembed.normalize_targets(jnp.asarray(raw_ours), std_ours))

    # --- The reference's quirks, measured before its step changes the student.
    loss_ours_eps, grads_ours_eps = _with_eps(student.encoder.norm, student_norm_eps, functools.partial(
        reference_loss_and_grads, student, teacher, images, masks_t))
    loss_lalign_eps, grads_lalign_eps = reference_loss_and_grads(student, teacher, images, masks_t)
    logits = attention_logits(student, images)

    # --- One step on each side.
    step = reference_step(train, ref, args, images, masks_t)
    grads_ref, update_ref = flat_np(convert(step["grads"])), flat_np(convert(step["update"]))
    before = flat_np(params)
    assert max(max_diff(before[k], v) for k, v in flat_np(convert(step["before"])).items()) == 0
    batch = (images_nhwc, masks, jnp.float32(std_ours), step_key)
    results = {rule: side.step(params, *batch) for rule, side in ours.items()}
    loss_ours, grads_ours, _ = results.get("all", results[rules[0]])

    # --- Tables.
    rows = [("student tokens (soft-capped student, forward_features)", *compare(tokens_ours, tokens_ref)),
            ("teacher targets, unscaled", *compare(raw_ours, raw_ref)),
            ("teacher targets / std", *compare(targets_ours, targets_ref)),
            ("target std (get_baseline_loss ** 0.5 | estimate_target_stats)", *compare(std_ours, std_ref)),
            ("loss (train_one_epoch | lalign's masked loss)", *compare(loss_ours, step["loss"])),
            ("student init (lalign init_from_teacher), all but decoder",
             *compare([init_ours[k] for k in kept], [init_ref[k] for k in kept]))]
    table("Forward: max |lalign - reference|, and relative to the largest |reference|",
          ("quantity", "max |ref|", "max |diff|", "relative"), rows)
    for (name, _, _, rel), tol in zip(rows, ("targets", "targets", "targets", "std", "loss", "targets")):
        check(name, rel, TOLERANCES[tol])

    grad_rows = gradient_rows(grads_ours, grads_ref, opts.all_tensors)
    norm = float(np.sqrt(sum(np.sum(g ** 2) for g in grads_ref.values())))
    table(f"Gradients before clipping, by name ({sum(r[1] for r in grad_rows)} lalign tensors = "
          f"{len(step['grads'])} reference tensors; global norm {norm:.4g}, clipped to {args.clip_grad})",
          ("part", "tensors", "max |grad|", "max |diff|", "relative", "worst tensor"), grad_rows)
    check("gradients, worst part (relative)", max(r[4] for r in grad_rows), TOLERANCES["gradients"])

    no_decay = timm_no_decay_names(student)
    in_no_decay = flat_np(convert({n: np.full(np.shape(v), float(n in no_decay)) for n, v in step["before"].items()}))
    split = {"timm no-decay (1-D)": ([k for k in before if in_no_decay[k].all()], len(no_decay)),
             "the rest": ([k for k in before if not in_no_decay[k].any()], len(step["before"]) - len(no_decay))}
    assert sum(len(keys) for keys, _ in split.values()) == len(before)
    lr, wd = args.lr, args.weight_decay
    update_rows = []
    for rule in rules:
        decayed = flat_np(weight_decay_mask(params, rule))
        for group, (keys, n_ref) in split.items():
            fit, err = decay_fit(results[rule][2], update_ref, before, keys, lr, wd)
            expect = expected_fit(before, keys, decayed)
            update_rows.append((rule, group, f"{n_ref} / {len(keys)}", err, err / lr, fit, expect))
            check(f"weight_decay_on={rule!r}, {group}: decay fit", fit, TOLERANCES["fit"], expect)
    table(f"One AdamW update (lr {lr}, wd {wd}): the reference decays every tensor; lalign by optimizer."
          f"weight_decay_on. fit: slope of (lalign - reference) against -lr*wd*p",
          ("weight_decay_on", "timm's group", "tensors (ref / lalign)", "max |diff|", "/ lr", "fit", "expected"),
          update_rows)
    print("  expected: 0 where lalign decays what the reference decays, -1 where it decays none of the group; "
          "between: the share of the group's |p|^2 that lalign leaves undecayed")
    print(f"  lalign.optim.DECAYED (leaf names decayed; None: all): {DECAYED}")

    # --- What each difference in defaults changes.
    teacher_eps = Lalign(configs[rules[0]], teacher_vit, teacher_params, decoder_eps=teacher_vit.ln_eps,
                         ).step(params, *batch)
    no_cap = Lalign(configs[rules[0]], teacher_vit, teacher_params, decoder_eps=decoder_eps, softcap=None)
    tokens_no_cap = np.asarray(no_cap.model.features(params, images_nhwc))
    loss_no_cap, grads_no_cap, _ = no_cap.step(params, *batch)
    quirk_rows = [
        ("decoder LayerNorm eps (the teacher's)", decoder_eps, teacher_vit.ln_eps,
         *effect(teacher_eps[0], teacher_eps[1], loss_ours, grads_ours)),
        ("student final LayerNorm eps", student_norm_eps, teacher_vit.ln_eps,
         *effect(loss_lalign_eps, convert(grads_lalign_eps), loss_ours_eps, convert(grads_ours_eps))),
        ("attention soft-cap", 30.0, "None", *effect(loss_no_cap, grads_no_cap, loss_ours, grads_ours))]
    table("Differences in defaults, on this batch: the reference's value vs lalign's default (loss and gradients "
          "relative, as above)", ("what", "reference", "lalign", "loss", "gradients"), quirk_rows)
    moved = np.sqrt(np.mean((tokens_no_cap - tokens_ours) ** 2) / np.mean(tokens_ours ** 2))
    print(f"  soft-cap: the student's attention logits reach {np.max(np.abs(logits)):.1f}; the cap changes "
          f"{np.mean(np.abs(30 * np.tanh(logits / 30) - logits) > 0.01 * np.abs(logits)):.1%} of them by more "
          f"than 1%; without it the student's tokens move by {moved:.2%} of their RMS")

    print("\n" + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    return 1 if failures else 0


def named_tensors(module) -> dict:
    return {n: p.detach().numpy().copy() for n, p in module.named_parameters()}


def compare(ours, theirs) -> tuple[float, float, float]:
    """(max |reference|, max |lalign - reference|, their ratio)."""
    if isinstance(ours, list):
        ours, theirs = (np.concatenate([np.ravel(a) for a in x]) for x in (ours, theirs))
    scale, diff = float(np.max(np.abs(theirs))), max_diff(ours, theirs)
    return scale, diff, diff / scale


def effect(loss, grads, loss_base, grads_base) -> tuple[float, float]:
    """(relative change of the loss, worst relative gradient change by part) between two settings."""
    worst = max(r[4] for r in gradient_rows(flat_np(grads), flat_np(grads_base), False))
    return abs(loss - loss_base) / abs(loss_base), worst


def _with_eps(norm, eps: float, fn):
    """fn() with a torch LayerNorm's eps set to `eps` for the call."""
    old, norm.eps = norm.eps, eps
    try:
        return fn()
    finally:
        norm.eps = old


if __name__ == "__main__":
    sys.exit(main())
