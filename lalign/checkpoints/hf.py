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

import dataclasses
import json
import os
import warnings
from typing import Callable, Mapping, Optional

import numpy as np

from lalign.checkpoints import mapping as m
from lalign.files import write_atomically, write_text
from lalign.checkpoints.common import (check_params, describe, expected_shapes, flatten, grid_of, random_map_head,
                                       scan_to_blocks, square_grid, take_map_head, to_layout, to_numpy, unflatten)
from lalign.checkpoints.common import load_safetensors
from lalign.models.vit import ViT, posemb_sincos_2d

ACT_TO_HF = {"gelu": "gelu_pytorch_tanh", "gelu_exact": "gelu", "quick_gelu": "quick_gelu"}
ACT_FROM_HF = {"gelu_pytorch_tanh": "gelu", "gelu_new": "gelu", "gelu_python_tanh": "gelu", "gelu": "gelu_exact",
               "gelu_python": "gelu_exact", "quick_gelu": "quick_gelu"}
P = "vision_model."


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn  # optional: comes with the [torch]/[test] extras
    except ImportError as e:  # pragma: no cover
        raise ImportError("Hugging Face / timm conversion needs `safetensors`: pip install safetensors") from e
    return stn


def guess_kind(model: ViT) -> str:
    if model.layerscale_init is not None or model.num_registers:
        return "dinov2"
    return "clip" if model.has_class_token and model.pre_norm else "siglip"


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
    m.Rule("mask_token", "embeddings.mask_token"),  # written as zeros (`_dinov2_config`); read back and dropped
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


# ------------------------------------------------------------------------------------------------ needs
@dataclasses.dataclass(frozen=True)
class Needs:
    """What every ViT written as a HF kind has: one that fails `holds` cannot be written, and `why` (formatted with
    the ViT as `m`, its `patch` size, its `mlp` size and the `kind`) says so."""

    holds: Callable[[ViT], bool]
    why: str


def _mlp(model: ViT) -> int:
    return model.mlp_dim or 4 * model.width


COMMON_NEEDS = (
    Needs(lambda v: tuple(v.patch_size)[0] == tuple(v.patch_size)[1],
          "HF needs square patches, got patch_size={patch}"),
    Needs(lambda v: v.attn_softcap is None, "HF attention has no logit soft-cap (attn_softcap={m.attn_softcap})"),
    Needs(lambda v: v.act in ACT_TO_HF, "activation {m.act!r} has no HF equivalent"),
)
_NOT_DINOV2 = Needs(lambda v: v.layerscale_init is None and not v.num_registers,
                    "HF {kind} has no LayerScale or register tokens (a DINOv2-style ViT: kind='dinov2')")
_SIGLIP_NEEDS = (
    _NOT_DINOV2,
    Needs(lambda v: not v.has_class_token,
          "SigLIP has no class token (a ViT with pre_norm and a class token is CLIP-like: kind='clip')"),
    Needs(lambda v: not v.pre_norm, "SigLIP has no pre-LayerNorm (pre_norm=True)"),
    Needs(lambda v: v.patch_bias, "SigLIP's patch embedding has a bias (patch_bias=False)"),
    Needs(lambda v: v.pool_type in ("map", "none"),
          "SigLIP pools with a MAP head: pool_type must be 'map' or 'none', got {m.pool_type!r}"),
)
_CLIP_NEEDS = (
    _NOT_DINOV2,
    Needs(lambda v: v.has_class_token, "CLIP needs a class token"),
    Needs(lambda v: not v.has_class_token or v.cls_posemb,
          "CLIP gives the class token its own position row (cls_posemb=True); this ViT adds position embeddings "
          "before prepending it (big_vision style)"),
    Needs(lambda v: v.posemb == "learn", "CLIP needs a learned position embedding"),
    Needs(lambda v: v.pre_norm, "CLIP has a pre-LayerNorm (pre_norm=False here)"),
    Needs(lambda v: not v.patch_bias, "CLIP's patch embedding has no bias (patch_bias=True here)"),
    Needs(lambda v: v.pool_type in ("tok", "none"),
          "CLIP pools the class token: pool_type must be 'tok' or 'none', got {m.pool_type!r}"),
)
_DINOV2_NEEDS = (
    Needs(lambda v: v.has_class_token, "DINOv2 needs a class token"),
    Needs(lambda v: v.posemb == "learn", "DINOv2 needs a learned position embedding"),
    Needs(lambda v: v.layerscale_init is not None,
          "HF DINOv2 has LayerScale in every block (layerscale_init is None here)"),
    Needs(lambda v: not v.pre_norm, "DINOv2 has no pre-LayerNorm (pre_norm=True here)"),
    Needs(lambda v: v.patch_bias, "DINOv2's patch embedding has a bias (patch_bias=False here)"),
    Needs(lambda v: v.pool_type in ("tok", "none"),
          "DINOv2 pools the class token: pool_type must be 'tok' or 'none', got {m.pool_type!r}"),
    Needs(lambda v: _mlp(v) % v.width == 0,
          "HF DINOv2 sizes the MLP as hidden_size * mlp_ratio with an integer mlp_ratio, which cannot give {mlp} "
          "for width {m.width}"),
)


def hf_problems(model: ViT, kind: str) -> list[str]:
    """Why `model` cannot be written as HF `kind` (empty list: it can): the `COMMON_NEEDS` and the kind's
    (`HF_KINDS[kind].needs`) it fails."""
    if kind not in HF_KINDS:
        raise ValueError(f"Unknown kind {kind!r}; choose from {KINDS}.")
    values = dict(m=model, patch=tuple(model.patch_size), mlp=_mlp(model), kind=kind)
    return [n.why.format(**values) for n in (*COMMON_NEEDS, *HF_KINDS[kind].needs) if not n.holds(model)]


# ----------------------------------------------------------------------------------------------- export
def to_hf_state_dict(params: Mapping, model: ViT, kind: Optional[str] = None, *, head_params=None,
                     drop_head: bool = False, image_size=None, seed: int = 0) -> tuple[dict, dict]:
    """(state dict of numpy arrays with HF names, config dict). See the module docstring."""
    kind = kind or guess_kind(model)
    why = hf_problems(model, kind)
    if why:
        raise ValueError(f"This ViT cannot be exported as a Hugging Face {kind} vision model: " + "; ".join(why) + ".")
    p, grid = _blocks_on_square_grid(params, model, image_size)
    flat, config, meta = _common_export(p, model, grid)
    HF_KINDS[kind].configure(flat, config, meta, model, kind=kind, head_params=head_params, drop_head=drop_head,
                             seed=seed)
    sd = m.export(flat, HF_KINDS[kind].table, model.depth, f"HF {kind}", prefix=HF_KINDS[kind].prefix)
    config["lalign"] = meta
    return sd, config


def _blocks_on_square_grid(params: Mapping, model: ViT, image_size) -> tuple[dict, tuple[int, int]]:
    """(per-block numpy params, patch grid) of params that fit `model`; HF needs a square grid."""
    p = to_numpy(params)
    check_params(p, model, "to_hf(params)", image_size)
    gh, gw = grid_of(p, model, image_size)
    if gh != gw:
        raise ValueError(f"HF vision models need a square patch grid, got {gh}x{gw}.")
    if model.num_classes:
        warnings.warn(f"The classifier 'head' ({model.num_classes} classes) is not part of an HF vision tower and "
                      f"is not exported.", stacklevel=4)
    return scan_to_blocks(p), (gh, gw)


def _common_export(p: dict, model: ViT, grid: tuple[int, int]) -> tuple[dict, dict, dict]:
    """(flat params to write, config.json keys and "lalign" record every kind has): the classifier left out, a
    fixed sin-cos table written as the (frozen) values of a learned one."""
    gh, gw = grid
    patch, width = int(model.patch_size[0]), model.width
    flat = {k: v for k, v in flatten(p).items() if not k.startswith("head/")}
    if model.posemb != "learn":
        flat["pos_embedding"] = np.asarray(posemb_sincos_2d(gh, gw, width)).astype(flat["embedding/kernel"].dtype)
    config = dict(hidden_size=width, intermediate_size=_mlp(model), num_hidden_layers=model.depth,
                  num_attention_heads=model.num_heads, num_channels=3, image_size=gh * patch, patch_size=patch,
                  hidden_act=ACT_TO_HF[model.act], layer_norm_eps=float(model.ln_eps), attention_dropout=0.0)
    meta = {"pool_type": model.pool_type, "features": "", "head": None, "image_size": gh * patch}
    return flat, config, meta


def _siglip_config(flat: dict, config: dict, meta: dict, model: ViT, *, kind: str, head_params, drop_head: bool,
                   seed: int) -> None:
    """SigLIP (2): the MAP head (the ViT's, the given one, a random one, or none with vision_use_head=false)."""
    width = model.width
    meta["head"] = "model" if any(k.startswith("MAPHead_0/") for k in flat) else None
    if meta["head"] is None and not drop_head:
        head = take_map_head(head_params)
        meta["head"] = "given"
        if head is None:
            warnings.warn("This ViT has no MAP head (pool_type='none', e.g. an aligned student): writing a "
                          "RANDOMLY initialized head so that SiglipVisionModel loads strictly; its "
                          "pooler_output is meaningless. Pass head_params=<teacher params> to keep the "
                          "teacher's head, or drop_head=True to write vision_use_head=false.", stacklevel=4)
            head = random_map_head(model, seed)
            meta["head"] = "random"
        # a teacher head of another width would load silently wrong
        if np.shape(head["probe"]) != (1, 1, width):
            raise ValueError(f"head_params: probe has shape {np.shape(head['probe'])}, expected (1, 1, {width}).")
        flat.update(flatten(head, "MAPHead_0/"))
    config.update(model_type=f"{kind}_vision_model", architectures=[f"{kind.capitalize()}VisionModel"],
                  vision_use_head=meta["head"] is not None)
    if kind == "siglip2":  # NaFlex: the table is num_patches long, resized by HF to each image's grid
        config["num_patches"] = (config.pop("image_size") // int(model.patch_size[0])) ** 2
    meta["features"] = "last_hidden_state"


def _clip_config(flat: dict, config: dict, meta: dict, model: ViT, **_) -> None:
    config.update(model_type="clip_vision_model", architectures=["CLIPVisionModel"], projection_dim=model.width,
                  initializer_range=0.02, initializer_factor=1.0)
    meta["features"] = "post_layernorm(last_hidden_state)"


def _dinov2_config(flat: dict, config: dict, meta: dict, model: ViT, **_) -> None:
    """DINOv2 (with registers): the class token's position row, the MLP as mlp_ratio, and the masked-image-modelling
    token of every released checkpoint (unused by the features)."""
    if not model.cls_posemb:  # HF gives the class token a position row: a zero row leaves it as it is
        pos = flat["pos_embedding"]
        flat["pos_embedding"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    flat["mask_token"] = np.zeros((1, model.width), flat["cls"].dtype)
    registers = model.num_registers > 0
    config.pop("intermediate_size")  # HF DINOv2 sizes its MLP by mlp_ratio
    config.pop("attention_dropout")
    config.update(model_type="dinov2_with_registers" if registers else "dinov2",
                  architectures=["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
                  mlp_ratio=_mlp(model) // model.width, qkv_bias=True, use_swiglu_ffn=False,
                  layerscale_value=float(model.layerscale_init), hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    if registers:
        config["num_register_tokens"] = model.num_registers
    meta["features"] = "last_hidden_state"


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
    config, kind = _vision_config(config, path)
    c = _config_values(config, path)
    meta = config.get("lalign") or {}
    use_head = HF_KINDS[kind].map_head and c.get("vision_use_head", True)
    drop = use_head and meta.get("pool_type") == "none" and meta.get("head") in ("random", "given") and not keep_head
    model = HF_KINDS[kind].vit(c, meta, path, use_head=use_head and not drop, scan=scan)
    flat = HF_KINDS[kind].read(sd, model.clone(scan=False, pool_type="map") if use_head else model.clone(scan=False),
                               c, path, kind)
    if drop:
        flat = {k: v for k, v in flat.items() if not k.startswith("MAPHead_0/")}
    return model, to_layout(unflatten(flat), scan)


def _vision_config(config: dict, path: str) -> tuple[dict, str]:
    """(the vision model's config, its kind): a two-tower config's vision_config, with the "lalign" record."""
    mt = config.get("model_type", "")
    if f"{mt}_vision_model" in MODEL_TYPES:  # a two-tower SiglipModel / CLIPModel
        config = dict(config.get("vision_config") or {}, model_type=f"{mt}_vision_model",
                      lalign=config.get("lalign"))
        mt = config["model_type"]
    if mt not in MODEL_TYPES:
        raise ValueError(f"{path}/config.json: model_type {mt!r} is not a SigLIP (2), CLIP or DINOv2 vision model.")
    return config, MODEL_TYPES[mt]


def _config_values(config: dict, path: str) -> dict:
    """The config's values over its config class's defaults, checked and made scalar (square sizes only)."""
    defaults = HF_KINDS[MODEL_TYPES[config["model_type"]]].model_types[config["model_type"]]
    c = dict(defaults, **{k: v for k, v in config.items() if v is not None})
    if "num_patches" in defaults:  # NaFlex (SigLIP 2): a square table of num_patches rows, the grid it was trained at
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
    return c


def _vit_fields(c: dict, scan: bool) -> dict:
    """The ViT fields every kind's config gives."""
    return dict(patch_size=(c["patch_size"],) * 2, width=int(c["hidden_size"]), depth=int(c["num_hidden_layers"]),
                num_heads=int(c["num_attention_heads"]), act=ACT_FROM_HF[c["hidden_act"]],
                ln_eps=float(c["layer_norm_eps"]), scan=scan)


def _token_pool(meta: dict) -> str:
    """A class-token kind's pooling: 'none' where lalign wrote a head-less student, else the class token."""
    return meta.get("pool_type") if meta.get("pool_type") in ("tok", "none") else "tok"


def _siglip_vit(c: dict, meta: dict, path: str, *, use_head: bool, scan: bool) -> ViT:
    return ViT(**_vit_fields(c, scan), mlp_dim=int(c["intermediate_size"]), pool_type="map" if use_head else "none")


def _clip_vit(c: dict, meta: dict, path: str, *, use_head: bool, scan: bool) -> ViT:
    return ViT(**_vit_fields(c, scan), mlp_dim=int(c["intermediate_size"]), pool_type=_token_pool(meta),
               class_token=True, cls_posemb=True, pre_norm=True, patch_bias=False)


def _dinov2_vit(c: dict, meta: dict, path: str, *, use_head: bool, scan: bool) -> ViT:
    if c.get("use_swiglu_ffn"):
        raise ValueError(f"{path}/config.json: use_swiglu_ffn=true (DINOv2 giant's SwiGLU MLP); lalign's ViT "
                         f"blocks have a GELU MLP only.")
    if not c.get("qkv_bias", True):
        raise ValueError(f"{path}/config.json: qkv_bias=false; lalign's attention has q/k/v biases.")
    return ViT(**_vit_fields(c, scan), mlp_dim=int(int(c["hidden_size"]) * c["mlp_ratio"]),
               pool_type=_token_pool(meta), class_token=True, cls_posemb=True,
               layerscale_init=float(c["layerscale_value"]), num_registers=int(c["num_register_tokens"]))


def _vision_from_hf(sd: Mapping, stored: ViT, c: dict, path: str, kind: str) -> dict:
    """Flat params of the vision weights (`vision_model.`, or transformers 5's unprefixed names) of a SigLIP / CLIP
    state dict, for `stored` (the ViT with the head the file holds)."""
    vision = {k: v for k, v in sd.items() if k.startswith(P)}
    if not vision:  # transformers 5's save_pretrained of a vision model: no prefix
        vision = {P + k: v for k, v in sd.items() if k.startswith(("embeddings.", "encoder.", "post_layernorm",
                                                                    "pre_layrnorm", "head."))}
    vision = {k: v for k, v in vision.items() if not k.endswith("position_ids")}  # a buffer, not a weight
    g = int(c["image_size"]) // int(c["patch_size"])
    return m.import_params(vision, TABLES[kind], expected_shapes(stored, (g, g)), stored.depth,
                           f"{path}/model.safetensors", f"a {kind} vision model ({describe(stored)})", prefix=P)


def _dinov2_from_hf(sd: Mapping, model: ViT, c: dict, path: str, kind: str = "dinov2") -> dict:
    """Flat per-block params of a HF Dinov2Model / Dinov2WithRegistersModel state dict (also under `dinov2.`, as in
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
    return m.import_params(renamed, TABLES["dinov2"], expected_shapes(model.clone(scan=False), grid),
                           model.depth, f"{path}/model.safetensors", f"a DINOv2 model ({describe(model)})")


# ------------------------------------------------------------------------------------------------ kinds
@dataclasses.dataclass(frozen=True)
class Kind:
    """A HF vision model family: a new one is one entry in HF_KINDS with its table.

    table / prefix: the names (`mapping`), under `prefix` in the file. needs: what a ViT written as it has
    (beyond COMMON_NEEDS). configure(flat, config, meta, model, kind=, head_params=, drop_head=, seed=): its
    config.json keys, the "lalign" record's features, and the tensors it writes beyond the ViT's. model_types:
    the config.json model_types read as it -> the config class's defaults (for keys a config.json leaves out).
    vit(config values, lalign record, path, use_head=, scan=): the ViT a config describes. read(state dict,
    ViT as stored, config values, path, kind): its flat params. map_head: it may hold a MAP head
    (vision_use_head)."""

    table: list
    needs: tuple
    configure: Callable
    model_types: dict
    vit: Callable
    read: Callable = _vision_from_hf
    prefix: str = P
    map_head: bool = False


_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
_DINOV2_DEFAULTS = dict(hidden_size=768, mlp_ratio=4, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                        patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0,
                        num_register_tokens=0)
HF_KINDS = {
    "siglip": Kind(TABLES["siglip"], _SIGLIP_NEEDS, _siglip_config, map_head=True, vit=_siglip_vit,
                   model_types={"siglip_vision_model": dict(_SIGLIP_DEFAULTS, image_size=224)}),
    "siglip2": Kind(TABLES["siglip2"], _SIGLIP_NEEDS, _siglip_config, map_head=True, vit=_siglip_vit,
                    model_types={"siglip2_vision_model": dict(_SIGLIP_DEFAULTS, num_patches=256)}),
    "clip": Kind(TABLES["clip"], _CLIP_NEEDS, _clip_config, vit=_clip_vit, model_types={"clip_vision_model": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)}),
    # the released DINOv2 checkpoints have no prefix
    "dinov2": Kind(TABLES["dinov2"], _DINOV2_NEEDS, _dinov2_config, vit=_dinov2_vit, read=_dinov2_from_hf, prefix="",
                   model_types={"dinov2": _DINOV2_DEFAULTS,
                                "dinov2_with_registers": dict(_DINOV2_DEFAULTS, num_register_tokens=4)}),
}
KINDS = tuple(HF_KINDS)
MODEL_TYPES = {mt: kind for kind, k in HF_KINDS.items() for mt in k.model_types}  # config.json model_type -> kind
