"""timm `VisionTransformer` state dicts (safetensors) <-> big_vision ViT params.

timm names (timm/models/vision_transformer.py):

    patch_embed.proj.{weight,bias}   cls_token (1,1,D)   pos_embed (1,N[+1],D)   norm_pre.{weight,bias} (CLIP)
    blocks.{i}.norm1 / attn.qkv (3D,D; q,k,v stacked) / attn.proj / norm2 / mlp.fc1 / mlp.fc2
    norm.{weight,bias}               final norm (all tokens)
    attn_pool.{latent, q, kv (k,v stacked), proj, norm, mlp.fc1, mlp.fc2}   MAP head (global_pool='map')
    head.{weight,bias}               classifier

SigLIP-style models (`vit_base_patch16_siglip_224`: no class token, MAP head `attn_pool`) and CLIP-style models
(`vit_base_patch16_clip_quickgelu_224`: `norm_pre`, `cls_token` with a position row, no patch bias) map directly;
a big_vision class token (position embedding added before it is prepended) is timm's `no_embed_class=True`.

`to_timm` writes the state dict as safetensors (numpy only, no torch needed) and stores the timm constructor
arguments in the file's metadata (`timm_kwargs`, JSON); `timm_model(path)` builds the matching timm model with any
timm from 1.0.8 on (`timm_model(path, name=...)` through `timm.create_model`; a plain
`timm.create_model(name, pretrained=False, **kwargs)` needs timm >= 1.0.16, the first with `pool_include_prefix`).
Note timm's stock SigLIP configs use exact (erf) GELU where big_vision uses the tanh approximation: for bit-exact
features pass `act_layer='gelu_tanh'`, as `timm_kwargs` does. timm's `forward_features(x)` returns our
`aux['encoded']` (final norm on every token), and `forward_head(.., pre_logits=True)` our pooled output.

Versions: timm < 1.0.16 has no `pool_include_prefix` (its MAP head always sees the prefix tokens, as big_vision's
does), and timm < 1.0.15 builds the MAP head's MLP with exact GELU whatever `act_layer` says; `timm_model` leaves
out an argument the installed timm lacks where its fixed behaviour is the one asked for (else one line names the
timm release needed), and gives the MAP head the blocks' activation.

A head-less aligned student (pool_type 'none') is written with `global_pool=''` (no head; loads strictly); pass
`head_params=` (the teacher's params or its MAPHead_0) to include the teacher's MAP head as `attn_pool`.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import os
from functools import partial
from typing import Mapping, Optional

import numpy as np

from lalign.checkpoints import mapping as m
from lalign.files import write_atomically
from lalign.checkpoints.common import (LOADED_LAYERSCALE_INIT, check_params, expected_shapes, flatten, grid_of,
                                       model_fields, patch_rows, scan_to_blocks, square_grid, take_map_head,
                                       to_layout, to_numpy, unflatten)
from lalign.checkpoints.common import load_safetensors, open_safetensors
from lalign.models.vit import ViT, posemb_sincos_2d

ACT_TO_TIMM = {"gelu": "gelu_tanh", "gelu_exact": "gelu", "quick_gelu": "quick_gelu"}
ACT_FROM_TIMM = {v: k for k, v in ACT_TO_TIMM.items()}
POOL_TO_TIMM = {"map": "map", "tok": "token", "gap": "avg", "none": ""}
POOL_FROM_TIMM = {v: k for k, v in POOL_TO_TIMM.items()}


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn  # optional: comes with the [torch]/[test] extras
    except ImportError as e:  # pragma: no cover
        raise ImportError("timm conversion needs `safetensors`: pip install safetensors") from e
    return stn


def unsupported(sd: Mapping) -> list[str]:
    """What a timm state dict holds that lalign's ViT cannot compute (empty: nothing), by family."""
    keys = set(sd)
    why = []

    def has(*parts):
        return any(any(p in k for p in parts) for k in keys)

    if has("relative_position_bias_table", "relative_position_index"):
        why.append("relative position bias in attention (BEiT)")
    if has(".attn.q_bias", ".attn.v_bias") and not has(".attn.qkv.bias"):
        why.append("separate q/v attention biases without a k bias (BEiT)")
    if has("mlp.fc1_g", "mlp.fc1_x", "mlp.w12", "mlp.w3"):
        why.append("a gated SwiGLU MLP (EVA02, DINOv2 giant)")
    if has("rope", "freqs"):
        why.append("rotary position embedding (EVA02)")
    if has(".attn.q_proj.", ".attn.k_proj."):
        why.append("separate q/k/v projections of timm's Eva blocks (EVA02)")
    if has("mlp.norm.", "attn.norm."):
        why.append("a LayerNorm inside the MLP or attention (EVA02 sub-LN)")
    if has("q_norm", "k_norm"):
        why.append("qk-norm")
    if "dist_token" in keys:
        why.append("a distillation token (DeiT distilled)")
    if "fc_norm.weight" in keys and "norm.weight" not in keys:
        why.append("a norm after global average pooling (fc_norm) instead of a final norm on every token")
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and np.shape(fc1)[0] != np.shape(fc2)[1]:
        why.append(f"an MLP whose fc1 gives {np.shape(fc1)[0]} features for an fc2 that takes {np.shape(fc2)[1]} "
                   f"(a packed gated MLP, e.g. DINOv2 giant's SwiGLU)")
    return why


def _check_supported(sd: Mapping, source: str) -> None:
    why = unsupported(sd)
    if why:
        raise ValueError(f"{source}: this ViT has " + "; ".join(why) + ", which lalign's ViT does not have "
                         "(supported: plain, SigLIP, CLIP and DINOv2 ViTs: LayerScale, registers, MAP head).")


def timm_problems(model: ViT) -> list[str]:
    why = []
    if model.attn_softcap is not None:
        why.append(f"timm attention has no logit soft-cap (attn_softcap={model.attn_softcap})")
    if model.act not in ACT_TO_TIMM:
        why.append(f"activation {model.act!r} has no timm equivalent")
    if model.patch_bias == model.pre_norm:
        why.append(f"timm's patch embedding has a bias exactly when there is no pre-norm; got patch_bias="
                   f"{model.patch_bias}, pre_norm={model.pre_norm}")
    mlp = model.mlp_dim or 4 * model.width
    if int(model.width * (mlp / model.width)) != mlp:
        why.append(f"timm computes the MLP width as int(width * mlp_ratio), which cannot give {mlp} for width "
                   f"{model.width}")
    return why


def _no_embed_class(model: ViT) -> bool:
    """timm's no_embed_class: the position table has no rows for the prefix tokens. With a class token that has
    its own row (CLIP, DINOv2) it is False, and timm then wants a row for each register too (written as zeros)."""
    return model.num_prefix_tokens > 0 and not (model.has_class_token and model.cls_posemb)


def _register_rows(model: ViT) -> int:
    """Position rows timm keeps for the registers (zeros on export, folded into the registers on import)."""
    return model.num_registers if model.num_registers and not _no_embed_class(model) else 0


def timm_kwargs(model: ViT, grid: tuple[int, int], *, with_map_head: Optional[bool] = None) -> dict:
    """JSON-able keyword arguments of timm's `VisionTransformer` for `model` on a `grid` of patches.

    `norm_eps` is not a timm argument: `timm_model` turns it into `norm_layer=partial(LayerNorm, eps=...)`.
    """
    pool = model.pool_type if with_map_head is None else ("map" if with_map_head else model.pool_type)
    mlp = model.mlp_dim or 4 * model.width
    return dict(
        img_size=[grid[0] * model.patch_size[0], grid[1] * model.patch_size[1]], patch_size=list(model.patch_size),
        embed_dim=model.width, depth=model.depth, num_heads=model.num_heads, mlp_ratio=mlp / model.width,
        class_token=model.has_class_token, no_embed_class=_no_embed_class(model), reg_tokens=model.num_registers,
        init_values=model.layerscale_init,
        pre_norm=model.pre_norm, global_pool=POOL_TO_TIMM[pool], fc_norm=False,
        # lalign's MAP head attends to every token, prefix tokens (class token, registers) included
        pool_include_prefix=pool == "map" and model.num_prefix_tokens > 0, num_classes=model.num_classes or 0,
        act_layer=ACT_TO_TIMM[model.act], norm_eps=float(model.ln_eps),
    )


_BLK = "blocks.{i}"
TABLE = [
    m.Rule("embedding/kernel", "patch_embed.proj.weight", "conv"),
    m.Rule("embedding/bias", "patch_embed.proj.bias"),
    m.Rule("pos_embedding", "pos_embed"),
    m.Rule("cls", "cls_token"),
    m.Rule("registers", "reg_token"),
    *m.layernorm("pre_norm", "norm_pre"),
    *m.layernorm(f"{m.BLOCK}/LayerNorm_0", f"{_BLK}.norm1"),
    *m.packed_attention(f"{m.BLOCK}/MultiHeadDotProductAttention_0", f"{_BLK}.attn.qkv", f"{_BLK}.attn.proj"),
    m.Rule(f"{m.BLOCK}/LayerScale_0", f"{_BLK}.ls1.gamma"),
    *m.layernorm(f"{m.BLOCK}/LayerNorm_1", f"{_BLK}.norm2"),
    *m.mlp(f"{m.BLOCK}/MlpBlock_0", f"{_BLK}.mlp.fc1", f"{_BLK}.mlp.fc2"),
    m.Rule(f"{m.BLOCK}/LayerScale_1", f"{_BLK}.ls2.gamma"),
    *m.layernorm("Transformer/encoder_norm", "norm"),
    # MAP head: one learned query (latent), q on its own, k and v packed
    m.Rule("MAPHead_0/probe", "attn_pool.latent"),
    *m.packed("MAPHead_0/MultiHeadDotProductAttention_0", ("query",), "attn_pool.q.weight", "attn_pool.q.bias"),
    *m.packed("MAPHead_0/MultiHeadDotProductAttention_0", ("key", "value"), "attn_pool.kv.weight",
              "attn_pool.kv.bias"),
    *m.out_projection("MAPHead_0/MultiHeadDotProductAttention_0", "attn_pool.proj"),
    *m.layernorm("MAPHead_0/LayerNorm_0", "attn_pool.norm"),
    *m.mlp("MAPHead_0/MlpBlock_0", "attn_pool.mlp.fc1", "attn_pool.mlp.fc2"),
    *m.dense("head", "head"),
]


def to_timm_state_dict(params: Mapping, model: ViT, *, head_params=None, image_size=None) -> tuple[dict, dict]:
    """(timm state dict of numpy arrays, timm kwargs)."""
    why = timm_problems(model)
    if why:
        raise ValueError("This ViT cannot be exported as a timm VisionTransformer: " + "; ".join(why) + ".")
    p = to_numpy(params)
    check_params(p, model, "to_timm(params)", image_size)
    grid = grid_of(p, model, image_size)
    flat = flatten(scan_to_blocks(p))
    if model.posemb != "learn":  # fixed sin-cos, written as the values of timm's learned table
        flat["pos_embedding"] = np.asarray(posemb_sincos_2d(*grid, model.width)).astype(flat["embedding/kernel"].dtype)
    if _register_rows(model):  # [class row, one zero row per register, patch rows]
        pos = flat["pos_embedding"]
        flat["pos_embedding"] = np.concatenate([pos[:, :1], np.zeros_like(pos[:, :1]).repeat(model.num_registers, 1),
                                                pos[:, 1:]], axis=1)
    if "MAPHead_0" not in p and head_params is not None:
        head = take_map_head(head_params)
        if np.shape(head["probe"]) != (1, 1, model.width):
            raise ValueError(f"head_params: probe has shape {np.shape(head['probe'])}, expected "
                             f"(1, 1, {model.width}).")
        flat.update(flatten(head, "MAPHead_0/"))
    sd = m.export(flat, TABLE, model.depth, "timm VisionTransformer")
    return sd, timm_kwargs(model, grid, with_map_head="attn_pool.latent" in sd)


def to_timm(params: Mapping, model: ViT, path: str, *, head_params=None, image_size=None, dtype=None) -> dict:
    """Writes a timm state dict to `path` (.safetensors); returns the timm kwargs (also in the file's metadata)."""
    sd, kwargs = to_timm_state_dict(params, model, head_params=head_params, image_size=image_size)
    if dtype is not None:
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    fields = model_fields(model)
    if "attn_pool.latent" in sd and model.pool_type != "map":
        fields["lalign_head"] = "given"
    meta = {"format": "pt", "timm_kwargs": json.dumps(kwargs), "lalign_vit": json.dumps(fields)}
    write_atomically(path, lambda tmp: _safetensors_numpy().save_file(sd, tmp, metadata=meta), ".safetensors")
    return kwargs


def read_metadata(path: str) -> dict:
    """The safetensors metadata of a timm file (lalign's files: `timm_kwargs`, `lalign_vit`), without its tensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No timm safetensors file at {path}.")
    with open_safetensors(path) as f:
        return f.metadata() or {}


def read_timm(path: str) -> tuple[dict, dict]:
    """(state dict of numpy arrays, metadata dict) of a safetensors file."""
    meta = read_metadata(path)
    return load_safetensors(path), meta


def from_timm_state_dict(sd: Mapping, model: ViT, source: str = "timm state dict", *, image_size=None) -> dict:
    """big_vision params (per-block layout unless model.scan) for `model` from a timm state dict.

    Every key must be used: an unexpected or missing key, or a shape that does not match `model`, is a ValueError.
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: np.asarray(v) for k, v in sd.items()}
    _check_supported(sd, source)
    stored = model.clone(scan=False)
    if model.posemb != "learn":
        sd.pop("pos_embed", None)  # a materialized sin-cos table; the ViT recomputes it
    if _register_rows(model) and "pos_embed" in sd and "reg_token" in sd:
        # timm adds rows to the registers too (no_embed_class=False); lalign's registers have none: fold them in
        pos, r = sd["pos_embed"], model.num_registers
        sd["reg_token"] = sd["reg_token"] + pos[:, 1:1 + r]
        sd["pos_embed"] = np.concatenate([pos[:, :1], pos[:, 1 + r:]], axis=1)
    if image_size is None and "pos_embed" in sd:
        grid = square_grid(patch_rows(model, sd["pos_embed"].shape[1]), f"{source}: pos_embed", ": pass image_size")
    else:
        grid = grid_of({}, model, image_size)
    flat = m.import_params(sd, TABLE, expected_shapes(stored, grid), model.depth, source,
                           f"a ViT with {describe_short(model)}")
    return to_layout(unflatten(flat), model.scan)


def describe_short(model: ViT) -> str:
    return (f"depth={model.depth}, class_token={model.has_class_token}, pre_norm={model.pre_norm}, "
            f"pool_type={model.pool_type!r}, num_classes={model.num_classes}")


def model_from_timm_state_dict(sd: Mapping, num_heads: Optional[int] = None, **fields) -> ViT:
    """Infers the ViT of a timm state dict without lalign metadata. Shapes give everything except num_heads
    (required) and act / ln_eps (default: timm's stock exact GELU, and eps 1e-5 with pre-norm (CLIP) else 1e-6)."""
    if "patch_embed.proj.weight" not in sd:
        raise ValueError(f"Not a timm VisionTransformer state dict: no 'patch_embed.proj.weight' (keys: "
                         f"{sorted(sd)[:8]}).")
    _check_supported(sd, "timm state dict")
    if num_heads is None:
        raise ValueError("A timm state dict does not record the number of heads (qkv is packed): pass num_heads "
                         "(e.g. --variant B/16 or --num-heads 12).")
    w = np.shape(sd["patch_embed.proj.weight"])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    pre_norm = "norm_pre.weight" in sd
    fields.setdefault("act", "gelu_exact")
    fields.setdefault("ln_eps", 1e-5 if pre_norm else 1e-6)
    cls = "cls_token" in sd
    if cls and "cls_posemb" not in fields:
        rows = np.shape(sd["pos_embed"])[1]
        fields["cls_posemb"] = math.isqrt(rows) ** 2 != rows
    fields["num_registers"] = int(np.shape(sd["reg_token"])[1]) if "reg_token" in sd else 0
    if "blocks.0.ls1.gamma" in sd:
        fields.setdefault("layerscale_init", LOADED_LAYERSCALE_INIT)
    pool = fields.pop("pool_type", None)
    if "attn_pool.latent" in sd:
        pool = "map"
    elif pool not in ("tok", "gap", "none"):
        pool = "tok" if cls else "none"
    return ViT(patch_size=(w[2], w[3]), width=w[0], depth=depth, mlp_dim=np.shape(sd["blocks.0.mlp.fc1.weight"])[0],
               num_heads=num_heads, class_token=cls, pre_norm=pre_norm, patch_bias="patch_embed.proj.bias" in sd,
               pool_type=pool, num_classes=np.shape(sd["head.weight"])[0] if "head.weight" in sd else None,
               **fields)


def from_timm(path: str, *, scan: bool = False, keep_head: bool = False, num_heads: Optional[int] = None,
              image_size=None, **fields) -> tuple[ViT, dict]:
    """(ViT, params) from a timm safetensors file.

    Files written by `to_timm` carry the model in their metadata. Others are inferred from the keys and shapes,
    with `num_heads` required (and act / ln_eps as in `model_from_timm_state_dict`); `image_size` is needed
    for a non-square patch grid. A teacher head that
    `to_timm(head_params=...)` added to a head-less student is dropped unless keep_head=True.
    """
    sd, meta = read_timm(path)
    if "lalign_vit" in meta:
        spec = json.loads(meta["lalign_vit"])
        given_head = spec.pop("lalign_head", None) == "given"
        spec["patch_size"] = tuple(spec["patch_size"])
        spec.update(scan=False, **fields)
        if num_heads is not None:
            spec["num_heads"] = num_heads
        model = ViT(**spec)
        if given_head and keep_head:
            model = model.clone(pool_type="map")
        elif given_head:
            sd = {k: v for k, v in sd.items() if not k.startswith("attn_pool.")}
    else:
        model = model_from_timm_state_dict(sd, num_heads=num_heads, **fields)
    if image_size is None:
        image_size = json.loads(meta.get("timm_kwargs", "{}")).get("img_size")
    if image_size is None and model.posemb != "learn":
        raise ValueError(f"{path}: a sincos2d ViT needs the image size, which the file's metadata lacks: pass "
                         f"image_size.")
    params = from_timm_state_dict(sd, model, path, image_size=image_size)
    model = model.clone(scan=scan)
    return model, to_layout(params, scan)


# timm releases that added a VisionTransformer argument lalign's files use
ADDED_IN = {"pool_include_prefix": "1.0.16"}


def torchvision_hint(library: str) -> str:
    """One line: `library` imports torchvision, which is missing, and the pip command for the build of the installed
    torch (torch 2.M.p pairs with torchvision 0.(M+15).p; a local build tag such as +cpu names PyTorch's index)."""
    import torch  # optional: only where timm or open_clip is asked for

    release, _, local = torch.__version__.partition("+")
    major, minor, patch = (release.split(".") + ["0", "0"])[:3]
    head = f"{library} imports torchvision, which is not installed: "
    if major != "2" or not minor.isdigit():
        return head + f"install the torchvision release built for torch {torch.__version__}."
    spec = f"torchvision==0.{int(minor) + 15}.{patch}" + (f"+{local} --index-url https://download.pytorch.org/whl/"
                                                          f"{local}" if local else "")
    return head + f"pip install --no-deps {spec} (built for torch {torch.__version__}; --no-deps keeps that torch)."


def _import_timm():
    """(timm, its VisionTransformer); a missing torchvision, which timm imports at load, is one line naming the
    install command."""
    try:
        import timm  # optional (torch, timm): only where a timm model is built
        from timm.models.vision_transformer import VisionTransformer  # optional, as the line above
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "torchvision":
            raise ImportError(torchvision_hint("timm")) from None
        raise
    return timm, VisionTransformer


def _prefix_tokens(kwargs: Mapping) -> int:
    return int(kwargs.get("class_token", True)) + int(kwargs.get("reg_tokens", 0) or 0)


def kwargs_for_installed_timm(kwargs: Mapping, vit_class=None, version: Optional[str] = None) -> dict:
    """`kwargs` less the arguments the installed timm's VisionTransformer does not take, where leaving one out
    gives the same model (that timm's fixed behaviour is the value asked for); any other is a ValueError naming the
    timm release that has it. `vit_class` / `version`: the VisionTransformer to check against (default: timm's)."""
    if vit_class is None or version is None:
        timm, vit = _import_timm()
        vit_class, version = vit_class or vit, version or timm.__version__
    params = inspect.signature(vit_class.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    out = {k: v for k, v in kwargs.items() if k in params}
    for key in [k for k in kwargs if k not in params]:
        value = kwargs[key]
        if key == "pool_include_prefix" and (not _prefix_tokens(kwargs)
                                             or bool(value) == (kwargs.get("global_pool", "token") == "map")):
            continue  # before it: the MAP head pools every token, the other pools only the patches
        need = f"timm>={ADDED_IN[key]}" if key in ADDED_IN else "a timm that has it"
        raise ValueError(f"timm {version}'s VisionTransformer has no argument {key} (this model needs {key}="
                         f"{value!r}): install {need}.")
    return out


def match_map_head_activation(t) -> None:
    """Gives a timm model's MAP head (attn_pool) the activation of its blocks, as big_vision's MAPHead and timm >=
    1.0.15 have it; older timm builds that MLP with exact GELU whatever act_layer says (6e-4 off big_vision's tanh
    GELU at the pooled output)."""
    pool = getattr(t, "attn_pool", None)
    if pool is None or not len(t.blocks) or not hasattr(pool, "mlp"):
        return
    want = t.blocks[0].mlp.act
    if repr(pool.mlp.act) != repr(want):
        pool.mlp.act = copy.deepcopy(want)


def timm_model(source, name: Optional[str] = None, **overrides):
    """A timm VisionTransformer (random init) for a `to_timm` file (path) or a kwargs dict from `timm_kwargs`, for
    the installed timm (1.0.8 and later; see the module docstring).

    Needs torch and timm. `name`: build through `timm.create_model(name, pretrained=False, ...)` (a named
    config's other settings, e.g. its LayerNorm eps when the kwargs have no `norm_eps`). `overrides` replace
    individual timm arguments.
    """
    timm, vit_class = _import_timm()
    from timm.layers import LayerNorm  # optional (torch, timm), as _import_timm

    if isinstance(source, (str, os.PathLike)):
        _, meta = read_timm(os.fspath(source))
        if "timm_kwargs" not in meta:
            raise ValueError(f"{source}: no timm_kwargs metadata (not written by lalign.checkpoints.timm.to_timm).")
        kwargs = json.loads(meta["timm_kwargs"])
    else:
        kwargs = dict(source)
    kwargs.update(overrides)
    eps = kwargs.pop("norm_eps", None if name else 1e-6)
    if eps is not None:
        kwargs.setdefault("norm_layer", partial(LayerNorm, eps=eps))
    for k in ("img_size", "patch_size"):
        if isinstance(kwargs.get(k), list):
            kwargs[k] = tuple(kwargs[k])
    kwargs = kwargs_for_installed_timm(kwargs, vit_class, timm.__version__)
    t = timm.create_model(name, pretrained=False, **kwargs) if name else vit_class(**kwargs)
    match_map_head_activation(t)
    return t
