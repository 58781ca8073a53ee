"""Hugging Face `transformers` vision towers <-> big_vision ViT params.

    to_hf(params, model, "out/", kind="siglip")    # config.json + model.safetensors
    SiglipVisionModel.from_pretrained("out/")      # (or CLIPVisionModel for kind="clip"): no missing/unexpected keys
    model, params = from_hf("out/")                # also reads SiglipModel / CLIPModel (two-tower) directories

Writing needs only numpy and `safetensors` (no torch). Weights are written with the `vision_model.` prefix
(the layout of the released checkpoints, read by transformers 4.x and 5.x alike); `from_hf` reads both that and
transformers 5's unprefixed `save_pretrained` output. Which HF output is the feature a MaskEmbed-aligned model
was trained on (`aux['encoded']`: final LayerNorm applied to every token, prefix token first):

* SigLIP (`SiglipVisionModel`): `outputs.last_hidden_state` (HF applies `post_layernorm` to all tokens).
  `pooler_output` is the MAP head (`head`), i.e. our pooled output for pool_type 'map'.
* CLIP (`CLIPVisionModel`): `model.post_layernorm(outputs.last_hidden_state)` (transformers 5; in 4.x
  `model.vision_model.post_layernorm`). HF CLIP's
  `last_hidden_state` is the output of the last block *before* the final norm (our `aux['pre_ln']`), and its
  `post_layernorm` (our `Transformer/encoder_norm`) is applied to the pooled class token only: `pooler_output` =
  our pooled output for pool_type 'tok'.

Aligned students (pool_type 'none') have no pooling head, but `SiglipVisionModel` expects one. Options:
`head_params=` (the teacher's MAPHead_0, or the whole teacher params): exported as the head; otherwise a randomly
initialized head is written with a warning (`pooler_output` is then meaningless; the token features are not
affected); or `drop_head=True`: writes `vision_use_head: false`, and HF builds the model without a head
(`pooler_output` is None). Either way HF loads strictly. config.json records what was done under "lalign", and
`from_hf` drops such a head again so the round trip gives back the student.

What HF cannot express raises ValueError saying why: SigLIP needs no class token, no pre-norm, a patch bias and a
MAP head (or none); CLIP needs a class token with its own position row (cls_posemb), pre-norm, no patch bias and
class-token pooling (or none); both need square patches and a square patch grid, and no attention soft-cap.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Mapping, Optional

import numpy as np

from lalign.checkpoints import mapping as m
from lalign.files import write_atomically, write_text
from lalign.checkpoints.common import (check_params, describe, expected_shapes, flatten, grid_of, random_map_head,
                                       scan_to_blocks, square_grid, take_map_head, to_layout, to_numpy, unflatten)
from lalign.checkpoints.common import load_safetensors
from lalign.models.vit import ViT, posemb_sincos_2d

KINDS = ("siglip", "siglip2", "clip", "dinov2")
ACT_TO_HF = {"gelu": "gelu_pytorch_tanh", "gelu_exact": "gelu", "quick_gelu": "quick_gelu"}
ACT_FROM_HF = {"gelu_pytorch_tanh": "gelu", "gelu_new": "gelu", "gelu_python_tanh": "gelu", "gelu": "gelu_exact",
               "gelu_python": "gelu_exact", "quick_gelu": "quick_gelu"}
P = "vision_model."


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn
    except ImportError as e:  # pragma: no cover - safetensors comes with the [torch]/[test] extras
        raise ImportError("Hugging Face / timm conversion needs `safetensors`: pip install safetensors") from e
    return stn


def guess_kind(model: ViT) -> str:
    if model.layerscale_init is not None or model.num_registers:
        return "dinov2"
    return "clip" if model.has_class_token and model.pre_norm else "siglip"


def hf_problems(model: ViT, kind: str) -> list[str]:
    """Why `model` cannot be written as HF `kind` (empty list: it can)."""
    why = []
    if tuple(model.patch_size)[0] != tuple(model.patch_size)[1]:
        why.append(f"HF needs square patches, got patch_size={tuple(model.patch_size)}")
    if model.attn_softcap is not None:
        why.append(f"HF attention has no logit soft-cap (attn_softcap={model.attn_softcap})")
    if model.act not in ACT_TO_HF:
        why.append(f"activation {model.act!r} has no HF equivalent")
    if kind != "dinov2" and (model.layerscale_init is not None or model.num_registers):
        why.append(f"HF {kind} has no LayerScale or register tokens (a DINOv2-style ViT: kind='dinov2')")
    if kind in ("siglip", "siglip2"):
        if model.has_class_token:
            why.append("SigLIP has no class token (a ViT with pre_norm and a class token is CLIP-like: kind='clip')")
        if model.pre_norm:
            why.append("SigLIP has no pre-LayerNorm (pre_norm=True)")
        if not model.patch_bias:
            why.append("SigLIP's patch embedding has a bias (patch_bias=False)")
        if model.pool_type not in ("map", "none"):
            why.append(f"SigLIP pools with a MAP head: pool_type must be 'map' or 'none', got {model.pool_type!r}")
    elif kind == "clip":
        if not model.has_class_token:
            why.append("CLIP needs a class token")
        elif not model.cls_posemb:
            why.append("CLIP gives the class token its own position row (cls_posemb=True); this ViT adds position "
                       "embeddings before prepending it (big_vision style)")
        if model.posemb != "learn":
            why.append("CLIP needs a learned position embedding")
        if not model.pre_norm:
            why.append("CLIP has a pre-LayerNorm (pre_norm=False here)")
        if model.patch_bias:
            why.append("CLIP's patch embedding has no bias (patch_bias=True here)")
        if model.pool_type not in ("tok", "none"):
            why.append(f"CLIP pools the class token: pool_type must be 'tok' or 'none', got {model.pool_type!r}")
    elif kind == "dinov2":
        if not model.has_class_token:
            why.append("DINOv2 needs a class token")
        if model.posemb != "learn":
            why.append("DINOv2 needs a learned position embedding")
        if model.layerscale_init is None:
            why.append("HF DINOv2 has LayerScale in every block (layerscale_init is None here)")
        if model.pre_norm:
            why.append("DINOv2 has no pre-LayerNorm (pre_norm=True here)")
        if not model.patch_bias:
            why.append("DINOv2's patch embedding has a bias (patch_bias=False here)")
        if model.pool_type not in ("tok", "none"):
            why.append(f"DINOv2 pools the class token: pool_type must be 'tok' or 'none', got {model.pool_type!r}")
        mlp = model.mlp_dim or 4 * model.width
        if mlp % model.width:
            why.append(f"HF DINOv2 sizes the MLP as hidden_size * mlp_ratio with an integer mlp_ratio, which cannot "
                       f"give {mlp} for width {model.width}")
    else:
        raise ValueError(f"Unknown kind {kind!r}; choose from {KINDS}.")
    return why


# ------------------------------------------------------------------------------------------------ tables
# HF names without the "vision_model." prefix (added on export, stripped on import).
_LAYER = "encoder.layers.{i}"
_ENCODER = [
    *m.layernorm(f"{m.BLOCK}/LayerNorm_0", f"{_LAYER}.layer_norm1"),
    *m.attention(f"{m.BLOCK}/MultiHeadDotProductAttention_0", *(f"{_LAYER}.self_attn.{n}_proj" for n in "qkv"),
                 f"{_LAYER}.self_attn.out_proj"),
    *m.layernorm(f"{m.BLOCK}/LayerNorm_1", f"{_LAYER}.layer_norm2"),
    *m.mlp(f"{m.BLOCK}/MlpBlock_0", f"{_LAYER}.mlp.fc1", f"{_LAYER}.mlp.fc2"),
    *m.layernorm("Transformer/encoder_norm", "post_layernorm"),
]
_MAP_HEAD = [
    m.Rule("MAPHead_0/probe", "head.probe"),
    *m.packed_attention("MAPHead_0/MultiHeadDotProductAttention_0", "head.attention.", "head.attention.out_proj",
                        in_proj=True),
    *m.layernorm("MAPHead_0/LayerNorm_0", "head.layernorm"),
    *m.mlp("MAPHead_0/MlpBlock_0", "head.mlp.fc1", "head.mlp.fc2"),
]
_DINO_LAYER = "encoder.layer.{i}"
# Written with the names of the released checkpoints (facebook/dinov2-*), which transformers 4.x loads as they are
# and 5.x renames on load; 5.x's own names are read too (DINOV2_ALIASES).
_DINOV2 = [
    m.Rule("embedding/kernel", "embeddings.patch_embeddings.projection.weight", "conv"),
    m.Rule("embedding/bias", "embeddings.patch_embeddings.projection.bias"),
    m.Rule("cls", "embeddings.cls_token"),
    m.Rule("registers", "embeddings.register_tokens"),
    m.Rule("pos_embedding", "embeddings.position_embeddings"),
    *m.layernorm(f"{m.BLOCK}/LayerNorm_0", f"{_DINO_LAYER}.norm1"),
    *m.attention(f"{m.BLOCK}/MultiHeadDotProductAttention_0",
                 *(f"{_DINO_LAYER}.attention.attention.{n}" for n in ("query", "key", "value")),
                 f"{_DINO_LAYER}.attention.output.dense"),
    m.Rule(f"{m.BLOCK}/LayerScale_0", f"{_DINO_LAYER}.layer_scale1.lambda1"),
    *m.layernorm(f"{m.BLOCK}/LayerNorm_1", f"{_DINO_LAYER}.norm2"),
    *m.mlp(f"{m.BLOCK}/MlpBlock_0", f"{_DINO_LAYER}.mlp.fc1", f"{_DINO_LAYER}.mlp.fc2"),
    m.Rule(f"{m.BLOCK}/LayerScale_1", f"{_DINO_LAYER}.layer_scale2.lambda1"),
    *m.layernorm("Transformer/encoder_norm", "layernorm"),
]
DINOV2_ALIASES = {".attention.q_proj.": ".attention.attention.query.",
                  ".attention.k_proj.": ".attention.attention.key.",
                  ".attention.v_proj.": ".attention.attention.value.",
                  ".attention.o_proj.": ".attention.output.dense."}
TABLES = {
    "siglip": [
        m.Rule("embedding/kernel", "embeddings.patch_embedding.weight", "conv"),
        m.Rule("embedding/bias", "embeddings.patch_embedding.bias"),
        m.Rule("pos_embedding", "embeddings.position_embedding.weight", "unbatch"),
        *_ENCODER, *_MAP_HEAD,
    ],
    # SigLIP 2 NaFlex towers: a Linear over each flattened (row, column, channel) patch instead of the Conv
    "siglip2": [
        m.Rule("embedding/kernel", "embeddings.patch_embedding.weight", "patch_linear"),
        m.Rule("embedding/bias", "embeddings.patch_embedding.bias"),
        m.Rule("pos_embedding", "embeddings.position_embedding.weight", "unbatch"),
        *_ENCODER, *_MAP_HEAD,
    ],
    "clip": [
        m.Rule("embedding/kernel", "embeddings.patch_embedding.weight", "conv"),
        m.Rule("cls", "embeddings.class_embedding", "flatten"),
        m.Rule("pos_embedding", "embeddings.position_embedding.weight", "unbatch"),
        *m.layernorm("pre_norm", "pre_layrnorm"),  # (sic: HF's name)
        *_ENCODER,
    ],
    "dinov2": _DINOV2,
}


# ----------------------------------------------------------------------------------------------- export
def to_hf_state_dict(params: Mapping, model: ViT, kind: Optional[str] = None, *, head_params=None,
                     drop_head: bool = False, image_size=None, seed: int = 0) -> tuple[dict, dict]:
    """(state dict of numpy arrays with HF names, config dict). See the module docstring."""
    kind = kind or guess_kind(model)
    why = hf_problems(model, kind)
    if why:
        raise ValueError(f"This ViT cannot be exported as a Hugging Face {kind} vision model: " + "; ".join(why) + ".")
    p = to_numpy(params)
    check_params(p, model, "to_hf(params)", image_size)
    gh, gw = grid_of(p, model, image_size)
    if gh != gw:
        raise ValueError(f"HF vision models need a square patch grid, got {gh}x{gw}.")
    p = scan_to_blocks(p)
    patch = int(model.patch_size[0])
    width = model.width
    if model.num_classes:
        warnings.warn(f"The classifier 'head' ({model.num_classes} classes) is not part of an HF vision tower and "
                      f"is not exported.", stacklevel=3)

    flat = {k: v for k, v in flatten(p).items() if not k.startswith("head/")}
    if model.posemb != "learn":  # fixed sin-cos: written as the (frozen) values of a learned table.
        flat["pos_embedding"] = np.asarray(posemb_sincos_2d(gh, gw, width)).astype(flat["embedding/kernel"].dtype)
    config = dict(hidden_size=width, intermediate_size=model.mlp_dim or 4 * width,
                  num_hidden_layers=model.depth, num_attention_heads=model.num_heads, num_channels=3,
                  image_size=gh * patch, patch_size=patch, hidden_act=ACT_TO_HF[model.act],
                  layer_norm_eps=float(model.ln_eps), attention_dropout=0.0)
    meta = {"pool_type": model.pool_type, "features": "", "head": None, "image_size": gh * patch}

    if kind in ("siglip", "siglip2"):
        meta["head"] = "model" if "MAPHead_0" in p else None
        if "MAPHead_0" not in p and not drop_head:
            head = take_map_head(head_params)
            meta["head"] = "given"
            if head is None:
                warnings.warn("This ViT has no MAP head (pool_type='none', e.g. an aligned student): writing a "
                              "RANDOMLY initialized head so that SiglipVisionModel loads strictly; its "
                              "pooler_output is meaningless. Pass head_params=<teacher params> to keep the "
                              "teacher's head, or drop_head=True to write vision_use_head=false.", stacklevel=3)
                head = random_map_head(model, seed)
                meta["head"] = "random"
            # a teacher head of another width would load silently wrong
            if np.shape(head["probe"]) != (1, 1, width):
                raise ValueError(f"head_params: probe has shape {np.shape(head['probe'])}, expected (1, 1, {width}).")
            flat.update(flatten(head, "MAPHead_0/"))
        config.update(model_type=f"{kind}_vision_model", architectures=[f"{kind.capitalize()}VisionModel"],
                      vision_use_head=meta["head"] is not None)
        if kind == "siglip2":  # NaFlex: the table is num_patches long, resized by HF to each image's grid
            config.pop("image_size")
            config["num_patches"] = gh * gw
        meta["features"] = "last_hidden_state"
    elif kind == "clip":
        config.update(model_type="clip_vision_model", architectures=["CLIPVisionModel"], projection_dim=width,
                      initializer_range=0.02, initializer_factor=1.0)
        meta["features"] = "post_layernorm(last_hidden_state)"
    else:  # dinov2
        if not model.cls_posemb:  # HF gives the class token a position row: a zero row leaves it as it is
            pos = flat["pos_embedding"]
            flat["pos_embedding"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
        registers = model.num_registers > 0
        config.pop("intermediate_size")  # HF DINOv2 sizes its MLP by mlp_ratio
        config.update(model_type="dinov2_with_registers" if registers else "dinov2",
                      architectures=["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
                      mlp_ratio=(model.mlp_dim or 4 * width) // width, qkv_bias=True, use_swiglu_ffn=False,
                      layerscale_value=float(model.layerscale_init), hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
        config.pop("attention_dropout")
        if registers:
            config["num_register_tokens"] = model.num_registers
        meta["features"] = "last_hidden_state"
    prefix = "" if kind == "dinov2" else P  # the released DINOv2 checkpoints have no prefix
    sd = m.export(flat, TABLES[kind], model.depth, f"HF {kind}", prefix=prefix)
    if kind == "dinov2":  # masked-image-modelling token: in every released checkpoint, unused by the features
        sd["embeddings.mask_token"] = np.zeros((1, width), sd["embeddings.cls_token"].dtype)
    config["lalign"] = meta
    return sd, config


def to_hf(params: Mapping, model: ViT, outdir: str, kind: Optional[str] = None, *, head_params=None,
          drop_head: bool = False, image_size=None, seed: int = 0, dtype=None) -> dict:
    """Writes `outdir/config.json` and `outdir/model.safetensors` for `SiglipVisionModel` / `CLIPVisionModel`.

    kind: 'siglip' or 'clip' (default: 'clip' for a ViT with class token and pre-norm, else 'siglip').
    head_params / drop_head / seed: the pooling head of a head-less student (module docstring).
    image_size: needed only for a sincos2d position embedding (else read from the position table).
    dtype: cast the weights (e.g. np.float16); default keeps them (float32 params -> float32 file).
    Returns the config written.
    """
    sd, config = to_hf_state_dict(params, model, kind, head_params=head_params, drop_head=drop_head,
                                  image_size=image_size, seed=seed)
    if dtype is not None:
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    write_atomically(os.path.join(outdir, "model.safetensors"),
                     lambda f: _safetensors_numpy().save_file(sd, f, metadata={"format": "pt"}))
    write_text(os.path.join(outdir, "config.json"), json.dumps(config, indent=2) + "\n")
    return config


# ----------------------------------------------------------------------------------------------- import
def read_hf_dir(path: str) -> tuple[dict, dict]:
    """(config dict, flat state dict of numpy arrays) of a HF model directory (single or sharded safetensors)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory).")
    with open(cfg_path) as f:
        config = json.load(f)
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json); PyTorch .bin "
                                f"files are not read (re-save with safe_serialization=True).")
    sd = {}
    for fn in files:
        sd.update(load_safetensors(fn))
    return config, sd


def from_hf(path: str, *, scan: bool = False, keep_head: bool = False) -> tuple[ViT, dict]:
    """Reads a HF SigLIP/CLIP vision model (or the vision tower of a two-tower SiglipModel/CLIPModel directory).

    Returns (ViT, params) with big_vision names; `scan` picks the scanned layout. A head that `to_hf` added to a
    head-less student (config.json "lalign".head 'random'/'given') is dropped unless keep_head=True.
    Every vision weight must be used and present: anything else is a ValueError naming the key.
    """
    config, sd = read_hf_dir(path)
    mt = config.get("model_type", "")
    if mt in ("siglip", "siglip2", "clip"):
        config = dict(config.get("vision_config") or {}, model_type=f"{mt}_vision_model",
                      lalign=config.get("lalign"))
        mt = config["model_type"]
    if mt not in ("siglip_vision_model", "siglip2_vision_model", "clip_vision_model", "dinov2",
                  "dinov2_with_registers"):
        raise ValueError(f"{path}/config.json: model_type {mt!r} is not a SigLIP (2), CLIP or DINOv2 vision model.")
    kind = mt.split("_")[0]
    defaults = {  # the HF config classes' defaults, for keys a config.json leaves out
        "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        "siglip2": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_patches=256, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        "dinov2": dict(hidden_size=768, mlp_ratio=4, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                       patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0,
                       num_register_tokens=4 if mt == "dinov2_with_registers" else 0),
    }[kind]
    c = dict(defaults, **{k: v for k, v in config.items() if v is not None})
    if kind == "siglip2":  # a square table of num_patches rows: the grid it was trained at
        side, _ = square_grid(int(c["num_patches"]), f"{path}/config.json: the position table of num_patches")
        c["image_size"] = side * int(c["patch_size"])
    if c["hidden_act"] not in ACT_FROM_HF:
        raise ValueError(f"{path}/config.json: hidden_act {c['hidden_act']!r} is not supported "
                         f"(supported: {sorted(ACT_FROM_HF)}).")
    if c.get("num_channels", 3) != 3:
        raise ValueError(f"{path}/config.json: num_channels={c['num_channels']}; only RGB (3) is supported.")
    for k in ("image_size", "patch_size"):
        if isinstance(c[k], (list, tuple)):
            if len(set(c[k])) != 1:
                raise ValueError(f"{path}/config.json: non-square {k}={c[k]} is not supported.")
            c[k] = c[k][0]
    heads, depth, width = int(c["num_attention_heads"]), int(c["num_hidden_layers"]), int(c["hidden_size"])
    meta = config.get("lalign") or {}
    use_head = kind in ("siglip", "siglip2") and c.get("vision_use_head", True)
    drop = use_head and meta.get("pool_type") == "none" and meta.get("head") in ("random", "given")
    drop = drop and not keep_head
    if kind == "dinov2":
        if c.get("use_swiglu_ffn"):
            raise ValueError(f"{path}/config.json: use_swiglu_ffn=true (DINOv2 giant's SwiGLU MLP); lalign's ViT "
                             f"blocks have a GELU MLP only.")
        if not c.get("qkv_bias", True):
            raise ValueError(f"{path}/config.json: qkv_bias=false; lalign's attention has q/k/v biases.")
        pool = meta.get("pool_type") if meta.get("pool_type") in ("tok", "none") else "tok"
        model = ViT(patch_size=(c["patch_size"],) * 2, width=width, depth=depth,
                    mlp_dim=int(width * c["mlp_ratio"]), num_heads=heads, pool_type=pool, class_token=True,
                    cls_posemb=True, act=ACT_FROM_HF[c["hidden_act"]], ln_eps=float(c["layer_norm_eps"]),
                    layerscale_init=float(c["layerscale_value"]), num_registers=int(c["num_register_tokens"]),
                    scan=scan)
    elif kind in ("siglip", "siglip2"):
        pool = "map" if use_head and not drop else "none"
        model = ViT(patch_size=(c["patch_size"],) * 2, width=width, depth=depth, mlp_dim=int(c["intermediate_size"]),
                    num_heads=heads, pool_type=pool, act=ACT_FROM_HF[c["hidden_act"]],
                    ln_eps=float(c["layer_norm_eps"]), scan=scan)
    else:
        pool = meta.get("pool_type") if meta.get("pool_type") in ("tok", "none") else "tok"
        model = ViT(patch_size=(c["patch_size"],) * 2, width=width, depth=depth, mlp_dim=int(c["intermediate_size"]),
                    num_heads=heads, pool_type=pool, class_token=True, cls_posemb=True, pre_norm=True,
                    patch_bias=False, act=ACT_FROM_HF[c["hidden_act"]], ln_eps=float(c["layer_norm_eps"]), scan=scan)

    if kind == "dinov2":
        return model, to_layout(_dinov2_from_hf(sd, model, path), scan)
    vision = {k: v for k, v in sd.items() if k.startswith(P)}
    if not vision:  # transformers 5's save_pretrained of a vision model: no prefix
        vision = {P + k: v for k, v in sd.items() if k.startswith(("embeddings.", "encoder.", "post_layernorm",
                                                                    "pre_layrnorm", "head."))}
    vision = {k: v for k, v in vision.items() if not k.endswith("position_ids")}  # a buffer, not a weight
    g = int(c["image_size"]) // int(c["patch_size"])
    stored = model.clone(scan=False, pool_type="map") if use_head else model.clone(scan=False)
    flat = m.import_params(vision, TABLES[kind], expected_shapes(stored, (g, g)), depth, f"{path}/model.safetensors",
                           f"a {kind} vision model ({describe(stored)})", prefix=P)
    if drop:
        flat = {k: v for k, v in flat.items() if not k.startswith("MAPHead_0/")}
    return model, to_layout(unflatten(flat), scan)


def _dinov2_from_hf(sd: Mapping, model: ViT, path: str) -> dict:
    """Per-block params of a HF Dinov2Model / Dinov2WithRegistersModel state dict (also under `dinov2.`, as in
    Dinov2ForImageClassification; transformers 5 names are read as the released ones)."""
    if any(k.startswith("dinov2.") for k in sd):
        sd = {k[len("dinov2."):]: v for k, v in sd.items() if k.startswith("dinov2.")}
    renamed = {}
    for k, v in sd.items():
        for new, old in DINOV2_ALIASES.items():
            k = k.replace(new, old)
        renamed[k] = v
    renamed.pop("embeddings.mask_token", None)  # masked-image modelling only
    rows = np.shape(renamed.get("embeddings.position_embeddings", np.zeros((1, 1, 0))))[1] - 1
    grid = square_grid(rows, f"{path}: embeddings.position_embeddings")
    flat = m.import_params(renamed, TABLES["dinov2"], expected_shapes(model.clone(scan=False), grid),
                           model.depth, f"{path}/model.safetensors", f"a DINOv2 model ({describe(model)})")
    return unflatten(flat)
