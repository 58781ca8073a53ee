"""Vision Transformer in Flax linen with big_vision's parameter names.

The parameter tree is the one big_vision writes, so its checkpoints load without renaming:

    embedding/{kernel,bias}              patch Conv, kernel (p, p, 3, D)
    pos_embedding                        (1, N, D) learned (absent for sincos2d)
    cls                                  (1, 1, D) only with a class token
    registers                            (1, R, D) only with register tokens
    Transformer/encoderblock_{i}/...     per-block layout, or
    Transformer/encoderblock/...         scanned layout with a leading depth axis
      LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out}, LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}
    Transformer/encoder_norm
    MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
    head                                 only with num_classes

CLIP extras (off by default): `pre_norm` (a LayerNorm after the position embedding), a position row for the
class token (`cls_posemb`), quick-gelu, LayerNorm eps 1e-5, no patch-embedding bias.
DINOv2 extras (off by default): per-block LayerScale (`layerscale_init`: `encoderblock_{i}/LayerScale_{0,1}`, (D,)
each) and register tokens (`num_registers`: `registers`, (1, R, D)), placed after the class token and given no
position embedding, as DINOv2 and timm do. Prefix tokens (class + registers) come first in every token output.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name -> (width, depth, mlp_dim, num_heads), as in big_vision's `decode_variant`.
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}

POOL_TYPES = ("map", "tok", "gap", "none")


def decode_variant(variant: str) -> dict[str, Any]:
    """'B/16' -> {'width': 768, 'depth': 12, 'mlp_dim': 3072, 'num_heads': 12, 'patch_size': (16, 16)}."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS:
        raise ValueError(f"Unknown ViT variant {variant!r}: name must be one of {sorted(VARIANTS)}, e.g. 'B/16'.")
    width, depth, mlp_dim, num_heads = VARIANTS[name]
    out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    if patch:
        if not patch.isdigit():
            raise ValueError(f"Unknown ViT variant {variant!r}: patch size {patch!r} is not an integer.")
        out["patch_size"] = (int(patch), int(patch))
    return out


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0, dtype=jnp.float32):
    """Fixed 2D sin-cos position embedding (MoCo v3 / big_vision), shape (1, h*w, width)."""
    if width % 4:
        raise ValueError(f"sincos2d position embedding needs width divisible by 4, got {width}.")
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = np.einsum("m,d->md", y.reshape(-1), omega)
    x = np.einsum("m,d->md", x.reshape(-1), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(pe, dtype)[None]


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.gelu, "quick_gelu": quick_gelu, "gelu_exact": functools.partial(nn.gelu, approximate=False)}


def attention(query, key, value, bias=None, mask=None, dtype=None, precision=None, *, softcap=None):
    """Scaled dot-product attention over (..., T, H, hd) with an optional logit soft-cap `c*tanh(x/c)`.

    Softmax runs in float32 whatever the compute dtype (bf16 logits lose too much in the normalizer).
    The heads are moved in front of the tokens before the two batched matmuls, and the output moved back: on
    XLA:CPU the same einsums written over (..., T, H, hd) let layout assignment pick strided operands for some
    of the batched dots (6-35 GFLOP/s); heads-major they run as contiguous per-head matmuls, and a ViT-B/16
    MaskEmbed step is ~20% faster (docs/performance.md, "Attention layout on XLA:CPU (heads-major)"). On TPU
    and GPU the compiler chooses layouts either way.
    """
    del dtype
    depth = query.shape[-1]
    query, key, value = (jnp.swapaxes(x, -3, -2) for x in (query, key, value))  # (..., H, T, hd)
    query = query / jnp.sqrt(depth).astype(query.dtype)
    logits = jnp.einsum("...hqd,...hkd->...hqk", query, key, precision=precision).astype(jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.swapaxes(jnp.einsum("...hqk,...hkd->...hqd", weights, value, precision=precision), -3, -2)


def fused_attention(query, key, value, bias=None, mask=None, dtype=None, precision=None):
    """`jax.nn.dot_product_attention`: XLA's attention, or a fused kernel (cuDNN flash attention) where the backend
    has one for these shapes and dtypes. Same result as `attention` (float32 softmax)."""
    del dtype, precision
    batch = query.shape[:-3]
    flat = lambda x: x.reshape((-1,) + x.shape[-3:])  # noqa: E731 - (B, T, H, hd) as the function wants
    if bias is not None:
        bias = jnp.broadcast_to(bias, batch + bias.shape[-3:]).reshape((-1,) + bias.shape[-3:])
    if mask is not None:
        mask = jnp.broadcast_to(mask, batch + mask.shape[-3:]).reshape((-1,) + mask.shape[-3:])
    out = jax.nn.dot_product_attention(flat(query), flat(key), flat(value), bias=bias, mask=mask)
    return out.reshape(query.shape[:-1] + value.shape[-1:])


ATTENTION_IMPLS = ("xla", "fused")


def attention_fn(impl: str = "xla", softcap: Optional[float] = None):
    """The attention function of a block: 'xla' (einsum + float32 softmax, supports the soft-cap) or 'fused'
    (`jax.nn.dot_product_attention`; cuDNN flash attention on GPUs). Measurements: docs/performance.md,
    "GPU (H100)"."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention_impl {impl!r}; choose from {ATTENTION_IMPLS}.")
    if impl == "fused":
        if softcap is not None:
            raise ValueError("attention_impl='fused' has no logit soft-cap; use attention_impl='xla' with "
                             "attn_softcap.")
        return fused_attention
    return functools.partial(attention, softcap=softcap)


class MlpBlock(nn.Module):
    mlp_dim: Optional[int] = None  # Defaults to 4x input dim.
    act: str = "gelu"
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        d = x.shape[-1]
        inits = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(stddev=1e-6))
        x = nn.Dense(self.mlp_dim or 4 * d, dtype=self.dtype, **inits)(x)
        x = ACTIVATIONS[self.act](x)
        x = nn.Dropout(rate=self.dropout)(x, deterministic)
        return nn.Dense(d, dtype=self.dtype, **inits)(x)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block; optional LayerScale (used by the MaskEmbed decoder and the probe)."""

    mlp_dim: Optional[int] = None
    num_heads: int = 12
    dropout: float = 0.0
    act: str = "gelu"
    ln_eps: float = 1e-6
    attn_softcap: Optional[float] = None
    attention_impl: str = "xla"
    layerscale_init: Optional[float] = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        def layerscale(y, name):
            if self.layerscale_init is None:
                return y
            gamma = self.param(name, nn.initializers.constant(self.layerscale_init), (y.shape[-1],))
            return y * gamma.astype(y.dtype)

        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            attention_fn=attention_fn(self.attention_impl, self.attn_softcap),
            dtype=self.dtype,
            deterministic=deterministic,
            name="MultiHeadDotProductAttention_0",
        )(y, y)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x = x + layerscale(y, "LayerScale_0")

        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_1")(x)
        y = MlpBlock(mlp_dim=self.mlp_dim, act=self.act, dropout=self.dropout, dtype=self.dtype, name="MlpBlock_0")(
            y, deterministic
        )
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        return x + layerscale(y, "LayerScale_1")


class _ScanBlock(Encoder1DBlock):
    """Encoder1DBlock with the (carry, out) signature nn.scan needs; `out` is the block's output."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = super().__call__(x, deterministic)
        return x, x


REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Encoder(nn.Module):
    """Stack of blocks + final LayerNorm. Returns (normed tokens, {'block00': ..., 'pre_ln': ...})."""

    depth: int
    mlp_dim: Optional[int] = None
    num_heads: int = 12
    dropout: float = 0.0
    act: str = "gelu"
    ln_eps: float = 1e-6
    attn_softcap: Optional[float] = None
    attention_impl: str = "xla"
    layerscale_init: Optional[float] = None
    scan: bool = False
    remat_policy: str = "none"
    dtype: Any = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        out = {}
        kw = dict(
            mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout, act=self.act,
            ln_eps=self.ln_eps, attn_softcap=self.attn_softcap, attention_impl=self.attention_impl,
            layerscale_init=self.layerscale_init, dtype=self.dtype,
        )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat_policy {self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}.")
        if self.scan:
            block_cls = _ScanBlock
            if self.remat_policy != "none":
                block_cls = nn.remat(block_cls, prevent_cse=False, static_argnums=(2,),
                                     policy=REMAT_POLICIES[self.remat_policy])
            x, per_block = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.depth,
            )(name="encoderblock", **kw)(x, deterministic)
            for i in range(self.depth):
                out[f"block{i:02d}"] = per_block[i]
        else:
            block_cls = Encoder1DBlock
            if self.remat_policy != "none":
                block_cls = nn.remat(block_cls, static_argnums=(2,), policy=REMAT_POLICIES[self.remat_policy])
            for i in range(self.depth):
                x = block_cls(name=f"encoderblock_{i}", **kw)(x, deterministic)
                out[f"block{i:02d}"] = x
        out["pre_ln"] = x
        return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="encoder_norm")(x), out


class MAPHead(nn.Module):
    """Multihead attention pooling with one learned query (SigLIP's head)."""

    mlp_dim: Optional[int] = None
    num_heads: int = 12
    act: str = "gelu"
    ln_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        n, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), jnp.float32)
        probe = jnp.tile(probe, [n, 1, 1]).astype(x.dtype)
        x = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
            attention_fn=attention_fn(self.attention_impl),
            dtype=self.dtype,
        )(probe, x)
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)(x)
        x = x + MlpBlock(mlp_dim=self.mlp_dim, act=self.act, dtype=self.dtype)(y)
        return x[:, 0]


class ViT(nn.Module):
    """big_vision-compatible ViT. `__call__` returns (output, aux) like big_vision's `_Model`.

    aux holds 'stem', 'with_posemb', 'encoded' (final-normed tokens, prefix tokens first), 'pre_ln',
    'block00'..., 'head_input', 'pre_logits' and, with a head, 'logits'.
    """

    num_classes: Optional[int] = None
    patch_size: Sequence[int] = (16, 16)
    width: int = 768
    depth: int = 12
    mlp_dim: Optional[int] = None
    num_heads: int = 12
    posemb: str = "learn"  # 'learn' or 'sincos2d'
    pool_type: str = "gap"  # 'map', 'tok', 'gap' or 'none'
    class_token: Optional[bool] = None  # None: only when pool_type == 'tok' (as big_vision).
    head_zeroinit: bool = True
    dropout: float = 0.0
    act: str = "gelu"
    ln_eps: float = 1e-6
    pre_norm: bool = False  # CLIP: LayerNorm before the encoder.
    cls_posemb: bool = False  # CLIP: the class token has its own position row (N+1 rows).
    patch_bias: bool = True  # CLIP: False.
    attn_softcap: Optional[float] = None
    layerscale_init: Optional[float] = None  # DINOv2: per-block LayerScale, initialized to this value.
    num_registers: int = 0  # DINOv2 with registers: extra learned tokens after the class token.
    attention_impl: str = "xla"  # 'xla' | 'fused' (jax.nn.dot_product_attention): a compute choice, no params
    scan: bool = False
    remat_policy: str = "none"
    dtype: Any = None  # Compute dtype (e.g. jnp.bfloat16); parameters stay float32.

    @property
    def has_class_token(self) -> bool:
        return self.pool_type == "tok" if self.class_token is None else self.class_token

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token, then the registers."""
        return int(self.has_class_token) + self.num_registers

    @nn.compact
    def __call__(self, image, *, train: bool = False):
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"Unknown pool_type {self.pool_type!r}; choose from {POOL_TYPES}.")
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"ViT expects images of shape (batch, height, width, 3), got {image.shape}.")
        out = {}
        x = out["stem"] = nn.Conv(
            self.width, tuple(self.patch_size), strides=tuple(self.patch_size), padding="VALID",
            use_bias=self.patch_bias, dtype=self.dtype, name="embedding",
        )(image)
        n, h, w, c = x.shape
        x = jnp.reshape(x, [n, h * w, c])

        if self.has_class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
            cls = jnp.tile(cls, [n, 1, 1]).astype(x.dtype)
        num_rows = h * w + int(self.has_class_token and self.cls_posemb)
        if self.posemb == "learn":
            pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)), (1, num_rows, c),
                             jnp.float32)
        elif self.posemb == "sincos2d":
            if self.cls_posemb:
                raise ValueError("cls_posemb needs a learned position embedding (posemb='learn').")
            pos = posemb_sincos_2d(h, w, c)
        else:
            raise ValueError(f"Unknown posemb {self.posemb!r}; choose 'learn' or 'sincos2d'.")
        pos = pos.astype(x.dtype)
        if self.has_class_token and self.cls_posemb:  # CLIP: the class token gets position row 0.
            x = jnp.concatenate([cls, x], axis=1) + pos
        else:  # big_vision: position embedding before the class token is prepended.
            x = x + pos
            if self.has_class_token:
                x = jnp.concatenate([cls, x], axis=1)
        if self.num_registers:
            registers = self.param("registers", nn.initializers.normal(stddev=1e-6), (1, self.num_registers, c),
                                   jnp.float32)
            registers = jnp.tile(registers, [n, 1, 1]).astype(x.dtype)
            k = int(self.has_class_token)
            x = jnp.concatenate([x[:, :k], registers, x[:, k:]], axis=1)
        out["with_posemb"] = x
        if self.pre_norm:
            x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="pre_norm")(x)
        x = nn.Dropout(rate=self.dropout)(x, not train)

        x, blocks = Encoder(
            depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout, act=self.act,
            ln_eps=self.ln_eps, attn_softcap=self.attn_softcap, attention_impl=self.attention_impl,
            layerscale_init=self.layerscale_init, scan=self.scan, remat_policy=self.remat_policy, dtype=self.dtype,
            name="Transformer",
        )(x, deterministic=not train)
        out.update(blocks)
        out["encoded"] = x

        if self.pool_type == "map":
            x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
                        attention_impl=self.attention_impl, dtype=self.dtype)(x)
        elif self.pool_type == "gap":
            x = jnp.mean(x[:, self.num_prefix_tokens:], axis=1)
        elif self.pool_type == "tok":
            x = x[:, 0]
        out["head_input"] = out["pre_logits"] = x

        if self.num_classes:
            kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
            x = out["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="head", **kw)(x)
        return x, out


def make_vit(variant: Optional[str] = None, **kwargs) -> ViT:
    """ViT from a big_vision variant string ('So400m/14') and overrides; unknown fields raise a clear error."""
    fields = set(ViT.__dataclass_fields__) - {"parent", "name"}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"Unknown ViT field(s) {sorted(unknown)}; valid fields: {sorted(fields)}.")
    spec = decode_variant(variant) if variant else {}
    spec.update({k: v for k, v in kwargs.items() if v is not None})
    if isinstance(spec.get("patch_size"), int):
        spec["patch_size"] = (spec["patch_size"], spec["patch_size"])
    return ViT(**spec)


def truncate_params(params: dict, num_blocks: int) -> dict:
    """Params of the first `num_blocks` blocks (either layout), dropping pooling head and classifier.

    With `model.clone(depth=num_blocks, pool_type='none', num_classes=None)` this computes the final norm of block
    `num_blocks` output: the MaskEmbed teacher target without running the blocks after it.
    """
    out = {k: v for k, v in params.items() if k not in ("MAPHead_0", "head")}
    tr = dict(params["Transformer"])
    if "encoderblock" in tr:
        tr["encoderblock"] = jax.tree.map(lambda a: a[:num_blocks], tr["encoderblock"])
    else:
        depth = sum(k.startswith("encoderblock_") for k in tr)
        if not 0 < num_blocks <= depth:
            raise ValueError(f"Cannot keep {num_blocks} blocks of a {depth}-block ViT.")
        tr = {k: v for k, v in tr.items()
              if not k.startswith("encoderblock_") or int(k.rsplit("_", 1)[1]) < num_blocks}
    out["Transformer"] = tr
    return out


def vit_from_config(config, num_classes: int | None = None) -> ViT:
    """The ViT `config.model` describes (a big_vision variant string and/or explicit fields): every teacher, pre-trained
    here or not, and through it the student, which is a clone."""
    kw = dict(config.model)
    variant = kw.pop("variant", None)
    return make_vit(variant, num_classes=num_classes, **kw)
