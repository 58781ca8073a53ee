"""open_clip `VisionTransformer` state dicts (the format LAION, DFN and MetaCLIP CLIP models ship in) <-> big_vision
ViT params.

open_clip names (open_clip/transformer.py), under `visual.` in a whole CLIP model's state dict:

    conv1.weight (no bias)   class_embedding (D,)   positional_embedding (N+1, D)   ln_pre
    transformer.resblocks.{i}.ln_1 / attn.in_proj_{weight,bias} (q,k,v packed) / attn.out_proj / ls_1.gamma
                             ln_2 / mlp.c_fc / mlp.c_proj / ls_2.gamma
    ln_post                  final norm (open_clip applies it to every token before pooling the class token)
    proj (D, E)              projection of the pooled token into the joint image-text space

`proj` becomes the ViT's classifier `head` (kernel = proj, bias 0): `pooled @ proj` is exactly the head's output,
and it round-trips. The MaskEmbed student drops it like any head; `to_open_clip(head_params=teacher)` writes the
teacher's back. What the weights do not record comes from `open_clip_config.json` beside the file when it is there
(the file open_clip's hub models carry: `model_cfg.vision_cfg`, `model_cfg.quick_gelu`), else from `fields`:
heads (open_clip: width // head_width, head_width 64 by default) and the activation (`quick_gelu` for the OpenAI
models, exact GELU otherwise); LayerNorm eps is 1e-5 (torch's default).

Not representable (a clear error): attentional pooling (CoCa), `final_ln_after_pool`, average pooling, qk-norm /
scaled-cosine attention, sin-cos position tables stored as buffers are read as learned tables.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import numpy as np

from lalign.checkpoints import mapping as m
from lalign.checkpoints.common import (LOADED_LAYERSCALE_INIT, check_params, expected_shapes, flatten, grid_of,
                                       model_fields, scan_to_blocks, square_grid, to_layout, to_numpy, unflatten)
from lalign.checkpoints.common import load_safetensors, open_safetensors
from lalign.checkpoints.timm import torchvision_hint
from lalign.files import write_atomically
from lalign.models.vit import ViT

PREFIX = "visual."
CONFIG_FILE = "open_clip_config.json"
ACT_TO_OPEN_CLIP = {"gelu_exact": (False, None), "quick_gelu": (True, None), "gelu": (False, {"approximate": "tanh"})}
_BLK = "transformer.resblocks.{i}"
TABLE = [
    m.Rule("embedding/kernel", "conv1.weight", "conv"),
    m.Rule("cls", "class_embedding", "flatten"),
    m.Rule("pos_embedding", "positional_embedding", "unbatch"),
    *m.layernorm("pre_norm", "ln_pre"),
    *m.layernorm(f"{m.BLOCK}/LayerNorm_0", f"{_BLK}.ln_1"),
    *m.packed_attention(f"{m.BLOCK}/MultiHeadDotProductAttention_0", f"{_BLK}.attn.", f"{_BLK}.attn.out_proj",
                        in_proj=True),
    m.Rule(f"{m.BLOCK}/LayerScale_0", f"{_BLK}.ls_1.gamma"),
    *m.layernorm(f"{m.BLOCK}/LayerNorm_1", f"{_BLK}.ln_2"),
    *m.mlp(f"{m.BLOCK}/MlpBlock_0", f"{_BLK}.mlp.c_fc", f"{_BLK}.mlp.c_proj"),
    m.Rule(f"{m.BLOCK}/LayerScale_1", f"{_BLK}.ls_2.gamma"),
    *m.layernorm("Transformer/encoder_norm", "ln_post"),
    m.Rule("head/kernel", "proj"),  # head/bias is 0: open_clip's projection has none
]


def is_open_clip(keys) -> bool:
    """Whether a state dict's keys are an open_clip VisionTransformer's (whole CLIP model or its `visual`)."""
    keys = set(keys)
    return bool({"conv1.weight", PREFIX + "conv1.weight"} & keys) and any(".resblocks." in k for k in keys)


def open_clip_problems(model: ViT) -> list[str]:
    why = []
    if not (model.has_class_token and model.cls_posemb):
        why.append("open_clip needs a class token with its own position row (class_token, cls_posemb)")
    if model.posemb != "learn":
        why.append("open_clip stores a position table (posemb='learn')")
    if model.patch_bias:
        why.append("open_clip's patch embedding (conv1) has no bias (patch_bias=True here)")
    if model.num_registers:
        why.append("open_clip has no register tokens")
    if model.pool_type not in ("tok", "none"):
        why.append(f"open_clip pools the class token: pool_type must be 'tok' or 'none', got {model.pool_type!r}")
    if model.attn_softcap is not None:
        why.append(f"open_clip attention has no logit soft-cap (attn_softcap={model.attn_softcap})")
    if model.act not in ACT_TO_OPEN_CLIP:
        why.append(f"activation {model.act!r} has no open_clip equivalent")
    if abs(model.ln_eps - 1e-5) > 1e-12:
        why.append(f"open_clip's LayerNorm eps is 1e-5 (ln_eps={model.ln_eps} here)")
    if model.patch_size[0] != model.patch_size[1]:
        why.append(f"open_clip needs square patches, got {tuple(model.patch_size)}")
    return why


# ----------------------------------------------------------------------------------------------- export
def vision_cfg(model: ViT, grid: tuple[int, int], output_dim: int) -> dict:
    """open_clip's `CLIPVisionCfg` fields (plus `quick_gelu` and `embed_dim`, as in `model_cfg`) for `model`."""
    quick, act_kwargs = ACT_TO_OPEN_CLIP[model.act]
    head_width = model.width // model.num_heads
    cfg = dict(layers=model.depth, width=model.width, head_width=head_width,
               mlp_ratio=(model.mlp_dim or 4 * model.width) / model.width, patch_size=int(model.patch_size[0]),
               image_size=[grid[0] * model.patch_size[0], grid[1] * model.patch_size[1]],
               ls_init_value=model.layerscale_init, no_ln_pre=not model.pre_norm)
    if act_kwargs:
        cfg["act_kwargs"] = act_kwargs
    return {"embed_dim": output_dim, "quick_gelu": quick, "vision_cfg": cfg}


def to_open_clip_state_dict(params: Mapping, model: ViT, *, head_params=None) -> tuple[dict, dict]:
    """(state dict with `visual.` names, open_clip model_cfg). The projection `proj` is the model's head, else
    the head of `head_params` (the teacher's params, for a head-less aligned student)."""
    why = open_clip_problems(model)
    if why:
        raise ValueError("This ViT cannot be exported as an open_clip VisionTransformer: " + "; ".join(why) + ".")
    p = to_numpy(params)
    check_params(p, model, "to_open_clip(params)")
    grid = grid_of(p, model)
    flat = flatten(scan_to_blocks(p))
    if "head/kernel" not in flat and head_params is not None:
        if "head" not in head_params:
            raise ValueError(f"head_params: no 'head' (open_clip's proj) among {sorted(head_params)}.")
        flat.update(flatten({"head": to_numpy(head_params["head"])}))
    if "head/kernel" not in flat:
        raise ValueError("open_clip's VisionTransformer has a projection (proj) that this ViT lacks: pass "
                         "head_params=<the teacher's params> (an open_clip teacher's proj is its 'head').")
    if np.any(flat.pop("head/bias")):
        raise ValueError("open_clip's projection has no bias, but this ViT's head bias is not zero.")
    if flat["head/kernel"].shape[0] != model.width:
        raise ValueError(f"head kernel has shape {flat['head/kernel'].shape}, expected ({model.width}, E).")
    sd = m.export(flat, TABLE, model.depth, "open_clip VisionTransformer", prefix=PREFIX)
    return sd, vision_cfg(model, grid, int(flat["head/kernel"].shape[1]))


def to_open_clip(params: Mapping, model: ViT, path: str, *, head_params=None, dtype=None) -> dict:
    """Writes `path` (.safetensors, `visual.` names) and returns open_clip's model_cfg, which the file's metadata
    also holds (`open_clip_model_cfg`); `open_clip_visual(path)` builds the matching open_clip tower."""
    sd, cfg = to_open_clip_state_dict(params, model, head_params=head_params)
    if dtype is not None:
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    fields = model_fields(model)
    if model.num_classes is None:
        fields["lalign_head"] = "given"  # the teacher's proj, dropped again on import
    meta = {"format": "pt", "open_clip_model_cfg": json.dumps(cfg), "lalign_vit": json.dumps(fields)}
    from safetensors.numpy import save_file  # optional ([torch]/[test] extras): needed only to write

    write_atomically(path, lambda tmp: save_file(sd, tmp, metadata=meta), ".safetensors")
    return cfg


# ----------------------------------------------------------------------------------------------- import
def read_open_clip(path: str) -> tuple[dict, dict, Optional[dict]]:
    """(visual state dict without the prefix, file metadata, model_cfg or None) of an open_clip .safetensors file;
    model_cfg from the metadata, else `open_clip_config.json` beside the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No open_clip safetensors file at {path}.")
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    sd = load_safetensors(path)
    if not is_open_clip(sd):
        raise ValueError(f"{path}: not an open_clip VisionTransformer state dict (no conv1.weight and "
                         f"transformer.resblocks.*; first keys {sorted(sd)[:6]}).")
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}  # the image tower of a CLIP
    cfg = json.loads(meta["open_clip_model_cfg"]) if "open_clip_model_cfg" in meta else None
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    if cfg is None and os.path.isfile(beside):
        with open(beside) as f:
            cfg = json.load(f).get("model_cfg")
    return sd, meta, cfg


def model_from_open_clip(sd: Mapping, cfg: Optional[Mapping] = None, source: str = "open_clip state dict",
                         **fields) -> ViT:
    """The ViT of an open_clip visual state dict: shapes give width, depth, MLP, patch, LayerScale, pre-norm and
    the projection; `cfg` (open_clip's model_cfg) or `fields` give heads and activation."""
    vc = dict((cfg or {}).get("vision_cfg") or {})
    unsupported = [k for k in ("attentional_pool", "final_ln_after_pool", "qk_norm", "scaled_cosine_attn",
                               "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc") if vc.get(k)]
    if vc.get("pool_type", "tok") != "tok":
        unsupported.append(f"pool_type={vc['pool_type']!r}")
    if vc.get("timm_model_name"):
        unsupported.append(f"timm_model_name={vc['timm_model_name']!r} (read it as a timm model instead)")
    if unsupported:
        raise ValueError(f"{source}: open_clip vision options lalign's ViT cannot represent: {unsupported}.")
    extra = sorted(k for k in sd if k.startswith(("attn_pool", "ln_q", "ln_k")) or ".ln_attn" in k)
    if extra:
        raise ValueError(f"{source}: open_clip tensors lalign's ViT cannot represent: {extra[:6]}.")
    w = np.shape(sd["conv1.weight"])
    width = int(w[0])
    heads = fields.pop("num_heads", None) or width // int(vc.get("head_width", 64))
    if heads < 1 or width % heads:
        raise ValueError(f"{source}: width {width} does not split into heads of open_clip's head_width "
                         f"{vc.get('head_width', 64)}: pass num_heads (--num-heads), or put open_clip_config.json "
                         f"beside the file.")
    if cfg is not None and "act" not in fields:
        approx = (vc.get("act_kwargs") or {}).get("approximate") == "tanh"
        fields["act"] = "quick_gelu" if cfg.get("quick_gelu") else ("gelu" if approx else "gelu_exact")
    fields.setdefault("act", "gelu_exact")
    fields.setdefault("ln_eps", 1e-5)
    if "transformer.resblocks.0.ls_1.gamma" in sd:
        fields.setdefault("layerscale_init", vc.get("ls_init_value") or LOADED_LAYERSCALE_INIT)
    fields.setdefault("pool_type", "tok")
    depth = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    return ViT(patch_size=(int(w[2]), int(w[3])), width=width, depth=depth,
               mlp_dim=int(np.shape(sd["transformer.resblocks.0.mlp.c_fc.weight"])[0]), num_heads=int(heads),
               class_token=True, cls_posemb=True, pre_norm="ln_pre.weight" in sd, patch_bias=False,
               num_classes=int(np.shape(sd["proj"])[1]) if "proj" in sd else None, **fields)


def from_open_clip_state_dict(sd: Mapping, model: ViT, source: str = "open_clip state dict") -> dict:
    """big_vision params for `model` from an open_clip visual state dict (every tensor used, every shape checked)."""
    sd = {k: np.asarray(v) for k, v in sd.items()}
    rows = sd["positional_embedding"].shape[0] - 1 if "positional_embedding" in sd else 0
    grid = square_grid(rows, f"{source}: positional_embedding")
    expected = flatten(expected_shapes(model.clone(scan=False), grid))
    expected.pop("head/bias", None)
    flat = m.import_params(sd, TABLE, expected, model.depth, source, f"an open_clip ViT ({model.depth} blocks)")
    if model.num_classes:
        flat["head/bias"] = np.zeros(model.num_classes, flat["head/kernel"].dtype)
    return to_layout(unflatten(flat), model.scan)


def from_open_clip(path: str, *, scan: bool = False, keep_head: bool = False, **fields) -> tuple[ViT, dict]:
    """(ViT, params) from an open_clip .safetensors file (a whole CLIP model: its image tower). A projection
    `to_open_clip(head_params=...)` added to a head-less student is dropped unless keep_head=True."""
    sd, meta, cfg = read_open_clip(path)
    if "lalign_vit" in meta:
        spec = json.loads(meta["lalign_vit"])
        given = spec.pop("lalign_head", None) == "given"
        spec.update(patch_size=tuple(spec["patch_size"]), scan=False)
        if given:
            spec["num_classes"] = None if not keep_head else int(np.shape(sd["proj"])[1])
            if not keep_head:
                sd.pop("proj")
        model = ViT(**spec)
    else:
        model = model_from_open_clip(sd, cfg, path, **fields)
    params = from_open_clip_state_dict(sd, model, path)
    return model.clone(scan=scan), to_layout(params, scan)


def open_clip_visual(path_or_cfg, **overrides):
    """An open_clip VisionTransformer (random init) for a `to_open_clip` file or a model_cfg dict. Needs torch
    and open_clip."""
    try:
        import open_clip.model as ocm  # optional (torch, open_clip): only where the tower is built
    except ModuleNotFoundError as e:  # open_clip imports torchvision at load
        if (e.name or "").split(".")[0] != "torchvision":
            raise
        raise ImportError(torchvision_hint("open_clip")) from None

    if isinstance(path_or_cfg, (str, os.PathLike)):
        _, _, cfg = read_open_clip(os.fspath(path_or_cfg))
    else:
        cfg = dict(path_or_cfg)
    vc = ocm.CLIPVisionCfg(**dict(cfg["vision_cfg"], **overrides))
    return ocm._build_vision_tower(cfg["embed_dim"], vc, quick_gelu=cfg.get("quick_gelu", False))
