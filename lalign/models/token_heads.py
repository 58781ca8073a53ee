"""Small transformer heads over a token sequence: the MaskEmbed decoder and the patch-level probe.

Both are "a few pre-LN blocks with LayerScale, a final LayerNorm and a Dense"; they differ in the position
embedding (decoder only: it is added *after* masking so the decoder knows where each zeroed token was), the
LayerScale init (decoder 1e-6, probe 0.01) and the output width.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn

from lalign.models.vit import Encoder1DBlock


class TokenHead(nn.Module):
    """(B, T, D) -> (B, T, out_dim) through `depth` LayerScale blocks of width D."""

    out_dim: int
    depth: int = 2
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layerscale_init: Optional[float] = 1e-6
    posemb: bool = True
    ln_eps: float = 1e-6
    act: str = "gelu"
    attention_impl: str = "xla"
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        _, t, d = x.shape
        if self.posemb:
            pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, t, d))
            x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = Encoder1DBlock(
                mlp_dim=int(self.mlp_ratio * d), num_heads=self.num_heads, act=self.act, ln_eps=self.ln_eps,
                layerscale_init=self.layerscale_init, attention_impl=self.attention_impl, dtype=self.dtype,
                name=f"encoderblock_{i}",
            )(x)
        x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="final_norm")(x)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="head")(x)


def MaskEmbedDecoder(out_dim: int, num_heads: int, depth: int = 2, **kw) -> TokenHead:
    """The MaskEmbed decoder (docs/design.md): 2 blocks, teacher width and heads, MLP ratio 4, LayerScale 1e-6,
    learned posemb."""
    return TokenHead(out_dim=out_dim, num_heads=num_heads, depth=depth, layerscale_init=1e-6, posemb=True, **kw)


def PatchProbe(num_classes: int, num_heads: int, depth: int = 2, **kw) -> TokenHead:
    """The patch probe (docs/design.md): 2 blocks at backbone width, LayerScale 0.01, LayerNorm + Dense -> classes."""
    return TokenHead(out_dim=num_classes, num_heads=num_heads, depth=depth, layerscale_init=0.01, posemb=False, **kw)
