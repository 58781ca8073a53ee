"""The pixel normalization of a checkpoint by lalign's names (lalign.data.images.NORMALIZATION): statistics a
checkpoint states, named (`named_normalization`), and its family's where it states none (`family_normalization`).
`load.checkpoint_normalization` asks each format's record which it is.
"""
from __future__ import annotations

import numpy as np

from lalign.data.images import NORMALIZATION

# config.data.normalization values that mean "the checkpoint's".
AUTO_NORMALIZATION = ("", "auto")
_STATS_TOLERANCE = 1e-3  # published statistics are rounded differently (0.48145466 vs 0.4815); names are 4e-3 apart


def named_normalization(mean, std, source: str) -> str:
    """lalign's name (lalign.data.images.NORMALIZATION) of per-channel pixel statistics of [0, 1] pixels; any
    other statistics are a ValueError naming them (lalign's data pipeline normalizes by name)."""
    mean, std = (np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (3,)) for v in (mean, std))
    for name, (m, sd) in NORMALIZATION.items():
        if np.allclose(mean, m, atol=_STATS_TOLERANCE) and np.allclose(std, sd, atol=_STATS_TOLERANCE):
            return name
    raise ValueError(f"{source}: mean {np.round(mean, 5).tolist()}, std {np.round(std, 5).tolist()} is none of "
                     f"lalign's normalizations {sorted(NORMALIZATION)}; set config.data.normalization to the one "
                     f"to use.")


def family_normalization(spec) -> tuple[str, str]:
    """(name, why) of a ViT's (or a dict of its fields') family when its checkpoint states no normalization: DINOv2
    (LayerScale or registers) and plain ViTs with a class token: 'imagenet'; CLIP (class token and pre-norm):
    'clip'; no class token (SigLIP): 'siglip'."""
    get = spec.get if isinstance(spec, dict) else (lambda k, d=None: getattr(spec, k, d))
    cls = get("class_token")
    cls = get("pool_type") == "tok" if cls is None else bool(cls)
    if get("layerscale_init") is not None or (get("num_registers") or 0):
        return "imagenet", "the DINOv2 family's (LayerScale or registers)"
    if cls and get("pre_norm"):
        return "clip", "the CLIP family's (class token and pre-norm)"
    if cls:
        return "imagenet", "the plain ViT family's (class token)"
    return "siglip", "the SigLIP family's (no class token)"


def family_of_names(names) -> dict:
    """The fields `family_normalization` reads, from parameter names alone (big_vision or timm)."""
    parts = {p for n in names for p in n.replace(".", "/").split("/")}
    return {"class_token": bool(parts & {"cls", "cls_token"}), "pre_norm": bool(parts & {"pre_norm", "norm_pre"}),
            "num_registers": int(bool(parts & {"registers", "reg_token"})),
            "layerscale_init": 1.0 if parts & {"LayerScale_0", "ls1"} else None}
