"""MaskEmbed: mask samplers, teacher targets and losses as pure functions, and the two Flax modules they run
(`Teacher`: the frozen teacher up to its target layer; `MaskEmbedModel`: the student and its decoder).

Shapes: images (B, H, W, 3); patch masks (B, M, N) with 1 = patch kept; token masks (B, M, T) where T = prefix
tokens + N and prefix tokens are always 0 (the student's class token carries no patch content of its own).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lalign.data.images import device_normalize
from lalign.models.token_heads import MaskEmbedDecoder, TokenHead
from lalign.models.vit import ViT, truncate_params

SAMPLERS = ("uniform", "bernoulli", "block")
LOSSES = ("mse", "cosine", "l1", "mse_masked", "mse_unmasked")


# ----------------------------------------------------------------------------------------------------- masks
def _with_complement_and_ones(m, antithetic: bool, include_ones: bool):
    """m: (B, N) bool -> (B, M, N): [m, 1-m if antithetic, all-ones if include_ones]."""
    rows = [m]
    if antithetic:
        rows.append(~m)
    if include_ones:
        rows.append(jnp.ones_like(m))
    return jnp.stack(rows, axis=1)


def uniform_masks(key, batch: int, num_patches: int, *, antithetic=True, include_ones=True):
    """The paper's sampler: number kept k ~ U{0..N}, then a uniformly random subset of that size."""
    k_key, perm_key = jax.random.split(key)
    num_kept = jax.random.randint(k_key, (batch, 1), 0, num_patches + 1)
    # Rank of each patch in a random permutation: the k lowest-ranked patches are a uniform subset of size k.
    ranks = jnp.argsort(jax.random.uniform(perm_key, (batch, num_patches)), axis=-1).argsort(axis=-1)
    return _with_complement_and_ones(ranks < num_kept, antithetic, include_ones)


def bernoulli_masks(key, batch: int, num_patches: int, *, keep_prob: float, antithetic=True, include_ones=True):
    """Each patch kept independently with probability `keep_prob` (the fraction *kept*, not masked)."""
    m = jax.random.bernoulli(key, keep_prob, (batch, num_patches))
    return _with_complement_and_ones(m, antithetic, include_ones)


def block_masks(key, batch: int, grid: tuple[int, int], *, num_blocks: int = 1, antithetic=True, include_ones=True):
    """Keeps the union of `num_blocks` random axis-aligned rectangles of patches (side lengths uniform in 1..grid)."""
    gh, gw = grid
    keys = jax.random.split(key, 4)
    shape = (batch, num_blocks)
    h = jax.random.randint(keys[0], shape, 1, gh + 1)
    w = jax.random.randint(keys[1], shape, 1, gw + 1)
    top = (jax.random.uniform(keys[2], shape) * (gh - h + 1)).astype(jnp.int32)
    left = (jax.random.uniform(keys[3], shape) * (gw - w + 1)).astype(jnp.int32)
    rows = jnp.arange(gh)[None, None, :, None]
    cols = jnp.arange(gw)[None, None, None, :]
    inside = ((rows >= top[..., None, None]) & (rows < (top + h)[..., None, None])
              & (cols >= left[..., None, None]) & (cols < (left + w)[..., None, None]))
    m = inside.any(axis=1).reshape(batch, gh * gw)
    return _with_complement_and_ones(m, antithetic, include_ones)


def sample_masks(key, batch: int, grid: tuple[int, int], cfg) -> jax.Array:
    """(B, M, N) boolean patch masks from the sampler named in `cfg.sampler`."""
    common = dict(antithetic=cfg.antithetic, include_ones=cfg.include_ones)
    n = grid[0] * grid[1]
    if cfg.sampler == "uniform":
        return uniform_masks(key, batch, n, **common)
    if cfg.sampler == "bernoulli":
        return bernoulli_masks(key, batch, n, keep_prob=cfg.keep_prob, **common)
    if cfg.sampler == "block":
        return block_masks(key, batch, grid, num_blocks=cfg.num_blocks, **common)
    raise ValueError(f"Unknown maskembed.sampler {cfg.sampler!r}; choose from {SAMPLERS}.")


def num_masks(cfg) -> int:
    return 1 + int(cfg.antithetic) + int(cfg.include_ones)


def pixel_mask(patch_masks, grid: tuple[int, int], patch_size, image_hw: tuple[int, int]):
    """(..., N) patch mask -> (..., H, W) pixel mask; pixels outside the patch grid (size not a multiple of the
    patch, e.g. 27*14 = 378 < 384) are zero, as the teacher's conv never sees them anyway."""
    gh, gw = grid
    ph, pw = patch_size
    m = patch_masks.reshape(*patch_masks.shape[:-1], gh, gw)
    m = jnp.repeat(jnp.repeat(m, ph, axis=-2), pw, axis=-1)
    pad_h, pad_w = image_hw[0] - gh * ph, image_hw[1] - gw * pw
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"Image {image_hw} is smaller than the patch grid {grid} x {tuple(patch_size)}.")
    pad = [(0, 0)] * (m.ndim - 2) + [(0, pad_h), (0, pad_w)]
    return jnp.pad(m, pad)


def patch_grid(image_hw, patch_size) -> tuple[int, int]:
    return image_hw[0] // patch_size[0], image_hw[1] // patch_size[1]


def token_masks(patch_masks, num_prefix_tokens: int):
    """(B, M, N) -> (B, M, P + N) float with prefix tokens always 0."""
    prefix = jnp.zeros((*patch_masks.shape[:-1], num_prefix_tokens), jnp.float32)
    return jnp.concatenate([prefix, patch_masks.astype(jnp.float32)], axis=-1)


# --------------------------------------------------------------------------------------------------- teacher
def target_num_blocks(depth: int, target_layer) -> int:
    """'penultimate' -> depth-1, 'last' -> depth, an int k -> k (1-based block count)."""
    if target_layer == "penultimate":
        return depth - 1
    if target_layer == "last":
        return depth
    if isinstance(target_layer, int) and 0 < target_layer <= depth:
        return target_layer
    raise ValueError(f"maskembed.target_layer must be 'penultimate', 'last' or 1..{depth}; got {target_layer!r}.")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The frozen teacher truncated to the target block; its output is the final norm of that block's output.

    Parameters are passed to each call (not closed over) so that a jitted step takes them as a sharded input
    instead of baking them into the program as constants.
    """

    model: ViT

    @classmethod
    def create(cls, teacher: ViT, params, target_layer="penultimate", dtype=None):
        """-> (Teacher, its params): the first k blocks of `teacher`, params cast to `dtype` (e.g. bf16)."""
        k = target_num_blocks(teacher.depth, target_layer)
        model = teacher.clone(depth=k, pool_type="none", num_classes=None, class_token=teacher.has_class_token,
                              dropout=0.0, dtype=dtype)
        params = truncate_params(params, k)
        if dtype is not None:
            params = jax.tree.map(lambda a: a.astype(dtype), params)
        return cls(model), params

    def __call__(self, params, images, patch_masks=None):
        """Teacher tokens (B, [M,] T, D) in float32 for the images, or for each masked copy of them."""
        if patch_masks is not None:
            b, m = patch_masks.shape[:2]
            grid = patch_grid(images.shape[1:3], self.model.patch_size)
            pm = pixel_mask(patch_masks, grid, self.model.patch_size, images.shape[1:3])
            images = (images[:, None] * pm[..., None].astype(images.dtype)).reshape(b * m, *images.shape[1:])
        _, aux = self.model.apply({"params": params}, images.astype(self.model.dtype or images.dtype))
        out = jax.lax.stop_gradient(aux["encoded"].astype(jnp.float32))
        return out if patch_masks is None else out.reshape(b, m, *out.shape[1:])


def estimate_target_stats(teacher: Teacher, params, batches, key, mask_cfg, *, whiten: bool = False,
                          eps: float = 1e-2, out_sharding=None, normalization: str = "siglip") -> dict:
    """Statistics of the teacher's outputs on masked images (masks drawn from `key` as in training), from one
    pass over equal-sized `batches`, accumulated in float64. The batches may be global arrays sharded over a
    mesh (`out_sharding`: replicated on it): the teacher then runs sharded like the train step, so no device
    holds more than its share of the pass. uint8 batches are normalized on the device with `normalization`
    (`lalign.data.images.device_normalize`), as in the train step.

    - 'std': their global std. Dividing by it makes the loss of the best constant prediction 1, so losses are
      comparable across backbones.
    - 'whitening' (only with `whiten`): ZCA whitening {'mean' (D,), 'matrix' (D, D)} such that
      (t - mean) @ matrix has (nearly) identity covariance. Why: the plain MSE weighs each feature direction by
      its variance, so directions of small variance barely count; whitened, every direction counts the same
      (docs/results.md, "Loss: MSE, cosine, masked-only, whitened"). The eigenvalues get `eps` x their mean added
      before the inverse square root, so near-null directions (a LayerNorm output has one exactly) are damped
      instead of blown up.
    """
    grid = patch_grid(batches[0].shape[1:3], teacher.model.patch_size)

    @functools.partial(jax.jit, out_shardings=out_sharding)
    def moments(params, images, key):  # params as an argument: a jit may not close over a multi-host array
        images = device_normalize(images, normalization)
        t = teacher(params, images, sample_masks(key, images.shape[0], grid, mask_cfg))
        if not whiten:  # global mean and mean square suffice
            return jnp.mean(t), jnp.mean(jnp.square(t))
        t = t.reshape(-1, t.shape[-1])
        return jnp.mean(t, 0), t.T @ t / t.shape[0]  # per-feature mean (D,), second moment (D, D)

    per_batch = [jax.device_get(moments(params, jnp.asarray(images), jax.random.fold_in(key, i)))
                 for i, images in enumerate(batches)]
    mean, second = (np.mean([np.asarray(b[j], np.float64) for b in per_batch], axis=0) for j in (0, 1))
    mean_sq = np.diag(second).mean() if whiten else second
    out = {"std": float(max(mean_sq - mean.mean() ** 2, 0.0) ** 0.5)}
    if whiten:
        eigvals, eigvecs = np.linalg.eigh(second - np.outer(mean, mean))
        eigvals = np.maximum(eigvals, 0.0)
        scale = (eigvals + eps * max(eigvals.mean(), 1e-12)) ** -0.5
        out["whitening"] = {"mean": mean.astype(np.float32),
                            "matrix": ((eigvecs * scale) @ eigvecs.T).astype(np.float32)}
    return out


def normalize_targets(targets, target_norm):
    """Teacher outputs -> the decoder's targets: divided by the std (a scalar), or whitened ({'mean', 'matrix'},
    `estimate_target_stats`)."""
    if isinstance(target_norm, dict):
        return (targets - target_norm["mean"]) @ target_norm["matrix"]
    return targets / target_norm


# ------------------------------------------------------------------------------------------- student+decoder
class MaskEmbedModel(nn.Module):
    """Student ViT (no head) -> final norm -> zero-init Dense -> x each mask -> decoder -> teacher space.

    The student sees each unmasked image once; masking happens on its output tokens, not its input.
    Params: {'student': big_vision ViT tree, 'proj': Dense, 'decoder': TokenHead}.
    """

    student: ViT
    decoder: TokenHead

    @nn.compact
    def __call__(self, images, token_masks, *, train: bool = False):
        _, aux = self.student(images, train=train)
        z = nn.Dense(self.decoder_width, kernel_init=nn.initializers.zeros, dtype=self.student.dtype,
                     name="proj")(aux["encoded"])
        b, m, t = token_masks.shape
        if z.shape[1] != t:
            raise ValueError(f"Student produced {z.shape[1]} tokens but the masks cover {t}.")
        z = (z[:, None] * token_masks[..., None].astype(z.dtype)).reshape(b * m, t, -1)
        pred = self.decoder(z).astype(jnp.float32)
        return pred.reshape(b, m, t, -1)

    @property
    def decoder_width(self) -> int:
        return self.decoder.out_dim

    def features(self, params, images):
        """The aligned backbone's output tokens (after its final norm), for probes and export."""
        return self.student.apply({"params": params["student"]}, images)[1]["encoded"]


def make_maskembed_model(teacher: ViT, cfg) -> MaskEmbedModel:
    """Student = teacher architecture without pooling head/classifier (prefix tokens kept); decoder as in
    docs/design.md."""
    dtype = jnp.dtype(cfg.student_dtype) if cfg.student_dtype else None
    student = teacher.clone(pool_type="none", num_classes=None, class_token=teacher.has_class_token,
                            attn_softcap=cfg.attn_softcap, dtype=dtype)
    decoder = MaskEmbedDecoder(out_dim=teacher.width, num_heads=teacher.num_heads, depth=cfg.decoder_depth,
                               ln_eps=cfg.decoder_ln_eps or teacher.ln_eps, act=teacher.act,
                               attention_impl=teacher.attention_impl, dtype=dtype)
    return MaskEmbedModel(student=student, decoder=decoder)


def init_from_teacher(model: MaskEmbedModel, teacher_params, key, example_images, masks_per_image: int):
    """Student = copy of the teacher minus pooling head and classifier, with its final norm re-initialized;
    proj zero-initialized; decoder freshly initialized."""
    grid = patch_grid(example_images.shape[1:3], model.student.patch_size)
    tm = jnp.ones((example_images.shape[0], masks_per_image, model.student.num_prefix_tokens + grid[0] * grid[1]))
    fresh = model.init(key, example_images, tm)["params"]
    # A real copy: the step donates the student's buffers, which must not be the teacher's.
    student = {k: jax.tree.map(jnp.array, v) for k, v in teacher_params.items() if k not in ("MAPHead_0", "head")}
    student["Transformer"] = dict(student["Transformer"], encoder_norm=fresh["student"]["Transformer"]["encoder_norm"])
    _check_same_structure(fresh["student"], student)
    return {"student": student, "proj": fresh["proj"], "decoder": fresh["decoder"]}


def _check_same_structure(expected, actual, what="teacher checkpoint"):
    exp = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    act = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(actual)}
    missing, unexpected = sorted(set(exp) - set(act)), sorted(set(act) - set(exp))
    wrong = [f"{k}: expected {exp[k]}, got {act[k]}" for k in sorted(set(exp) & set(act)) if exp[k] != act[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not match the model: missing {missing}, unexpected {unexpected}, "
                         f"wrong shapes {wrong}")


# ---------------------------------------------------------------------------------------------------- losses
def maskembed_loss(pred, target, token_masks, kind: str = "mse", num_prefix_tokens: int = 0):
    """Loss between decoder predictions and (scaled) teacher targets, both (B, M, T, D).

    mse / l1 / cosine average over masks, tokens and dims (cosine: over masks and tokens of 1 - cos).
    mse_masked / mse_unmasked average the squared error over patch tokens whose mask is 0 / 1 only (prefix
    tokens excluded); masks with no such token contribute nothing. Train and eval use this same function.
    """
    if kind == "mse":
        return jnp.mean(jnp.square(pred - target))
    if kind == "l1":
        return jnp.mean(jnp.abs(pred - target))
    if kind == "cosine":
        num = jnp.sum(pred * target, -1)
        den = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1)
        return jnp.mean(1.0 - num / jnp.maximum(den, 1e-8))
    if kind in ("mse_masked", "mse_unmasked"):
        keep = token_masks[..., num_prefix_tokens:]
        w = 1.0 - keep if kind == "mse_masked" else keep
        err = jnp.mean(jnp.square(pred - target), -1)[..., num_prefix_tokens:]
        return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)
    raise ValueError(f"Unknown maskembed.loss {kind!r}; choose from {LOSSES}.")


def draw_masks(key, images_shape, patch_size, cfg) -> tuple[jax.Array, jax.Array]:
    """(masks (B, M, N), dropout key) for a batch of images: the step's randomness, drawn once per batch so that
    gradient accumulation splits the same masks into micro-batches."""
    mask_key, dropout_key = jax.random.split(key)
    return sample_masks(mask_key, images_shape[0], patch_grid(images_shape[1:3], patch_size), cfg), dropout_key


def make_masked_loss_fn(model: MaskEmbedModel, teacher: Teacher, cfg) -> Callable:
    """masked_loss(params, teacher_params, images, masks, dropout_key, target_norm, train) -> (loss, aux): teacher
    targets on the masked copies (normalized by `target_norm`, see `normalize_targets`), predictions, loss."""

    def masked_loss(params, teacher_params, images, masks, dropout_key, target_norm, train: bool = True):
        targets = normalize_targets(teacher(teacher_params, images, masks), target_norm)
        tm = token_masks(masks, model.student.num_prefix_tokens)
        pred = model.apply({"params": params}, images, tm, train=train, rngs={"dropout": dropout_key})
        loss = maskembed_loss(pred, targets, tm, cfg.loss, model.student.num_prefix_tokens)
        return loss, {"loss": loss}

    return masked_loss


def make_loss_fn(model: MaskEmbedModel, teacher: Teacher, cfg) -> Callable:
    """loss_fn(params, teacher_params, images, key, target_norm, train) -> (loss, aux) for one batch: sample
    masks (`draw_masks`), then `make_masked_loss_fn`'s loss."""
    masked_loss = make_masked_loss_fn(model, teacher, cfg)

    def loss_fn(params, teacher_params, images, key, target_norm, train: bool = True):
        masks, dropout_key = draw_masks(key, images.shape, model.student.patch_size, cfg)
        return masked_loss(params, teacher_params, images, masks, dropout_key, target_norm, train)

    return loss_fn
