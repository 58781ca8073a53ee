"""Helpers shared by the converters: flat '/'-joined keys, layout changes, shape checks, model inference.

Everything here works on plain numpy trees (nested dicts of arrays) and needs neither torch nor a device.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lalign.models.vit import MAPHead, ViT, decode_variant

SEP = "/"
# ViT fields that the parameters determine (a value given for them must agree with the parameters).
STRUCTURAL = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "class_token", "pre_norm", "patch_bias",
              "posemb", "num_classes", "num_registers")
# Every ViT field a converter writes into / reads from its metadata.
MODEL_FIELDS = ("num_classes", "patch_size", "width", "depth", "mlp_dim", "num_heads", "posemb", "pool_type",
                "class_token", "act", "ln_eps", "pre_norm", "cls_posemb", "patch_bias", "attn_softcap", "scan",
                "layerscale_init", "num_registers")
# The init value of a loaded LayerScale does not matter (the parameters are loaded); DINOv2's, for the record.
LOADED_LAYERSCALE_INIT = 1e-5


# ------------------------------------------------------------------------------------------- safetensors
def open_safetensors(path: str):
    """`safe_open(path)` (numpy), where a file safetensors cannot read (truncated, damaged, not safetensors) is a
    ValueError naming it: safetensors' own error names no file, and the CLIs report a ValueError as one line."""
    from safetensors import SafetensorError, safe_open  # optional ([torch]/[test] extras): read only for HF/timm

    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or damaged ({e}); download or "
                         f"write it again.") from None


def load_safetensors(path: str) -> dict:
    """Every tensor of a safetensors file as numpy arrays (`open_safetensors`' errors)."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + SEP))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{'a/b': x} -> {'a': {'b': x}}; a key that is both a leaf and a prefix is an error."""
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(SEP)
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"Key {key!r}: {p!r} is both a leaf and a group.")
        if leaf in node:
            raise ValueError(f"Duplicate key {key!r}.")
        node[leaf] = v
    return out


def to_numpy(tree):
    """Nested dict of (jax or numpy) arrays -> nested dict of numpy arrays (copies from device)."""
    if isinstance(tree, Mapping):
        return {k: to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


# ------------------------------------------------------------------------------------------------ layouts
def _transformer(params: Mapping) -> Mapping:
    if "Transformer" not in params:
        raise ValueError(f"Not ViT params: no 'Transformer' entry (top-level keys: {sorted(params)}).")
    return params["Transformer"]


def is_scanned(params: Mapping) -> bool:
    return "encoderblock" in _transformer(params)


def depth_of(params: Mapping) -> int:
    tr = _transformer(params)
    if "encoderblock" in tr:
        return int(np.shape(flatten(tr["encoderblock"])["LayerNorm_0/scale"])[0])
    return sum(k.startswith("encoderblock_") for k in tr)


def scan_to_blocks(params: Mapping) -> dict:
    """Scanned layout (`Transformer/encoderblock/...`, leading depth axis) -> `Transformer/encoderblock_{i}/...`.

    Params already in the per-block layout are returned unchanged (as a shallow copy).
    """
    params = dict(params)
    tr = dict(_transformer(params))
    if "encoderblock" not in tr:
        return params
    stacked = flatten(tr.pop("encoderblock"))
    depths = {k: np.shape(v)[0] for k, v in stacked.items()}
    if len(set(depths.values())) != 1:
        raise ValueError(f"Scanned blocks disagree on the depth (leading axis): {depths}.")
    depth = next(iter(depths.values()))
    for i in range(depth):
        tr[f"encoderblock_{i}"] = unflatten({k: np.asarray(v)[i] for k, v in stacked.items()})
    params["Transformer"] = tr
    return params


def blocks_to_scan(params: Mapping) -> dict:
    """Per-block layout (`Transformer/encoderblock_{i}/...`) -> scanned `Transformer/encoderblock/...`.

    Params already in the scanned layout are returned unchanged (as a shallow copy).
    """
    params = dict(params)
    tr = dict(_transformer(params))
    if "encoderblock" in tr:
        return params
    names = sorted((k for k in tr if k.startswith("encoderblock_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if not names:
        raise ValueError("No 'Transformer/encoderblock_{i}' entries to stack.")
    if [int(k.rsplit("_", 1)[1]) for k in names] != list(range(len(names))):
        raise ValueError(f"Blocks are not numbered 0..{len(names) - 1}: {names}.")
    blocks = [flatten(tr.pop(k)) for k in names]
    for i, b in enumerate(blocks[1:], 1):
        if set(b) != set(blocks[0]):
            raise ValueError(f"encoderblock_{i} has other parameters than encoderblock_0: "
                             f"{sorted(set(b) ^ set(blocks[0]))}.")
    tr["encoderblock"] = unflatten({k: np.stack([np.asarray(b[k]) for b in blocks]) for k in blocks[0]})
    params["Transformer"] = tr
    return params


def to_layout(params: Mapping, scan: bool) -> dict:
    return blocks_to_scan(params) if scan else scan_to_blocks(params)


# ------------------------------------------------------------------------------------------- shape checks
def _fmt(keys, limit=8):
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_shapes(got: Mapping, expected: Mapping, source: str, what: str = "the model") -> None:
    """Raises ValueError naming `source` and every missing / unexpected key and (key, expected, actual) shape."""
    g, e = flatten(got), flatten(expected)
    missing, unexpected = set(e) - set(g), set(g) - set(e)
    bad = [(k, tuple(np.shape(e[k])), tuple(np.shape(g[k]))) for k in sorted(set(g) & set(e))
           if tuple(np.shape(e[k])) != tuple(np.shape(g[k]))]
    if not (missing or unexpected or bad):
        return
    lines = [f"{source}: parameters do not match {what}:"]
    if missing:
        lines.append(f"  missing ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {_fmt(unexpected)}")
    for k, es, gs in bad[:8]:
        lines.append(f"  shape mismatch at {k!r}: expected {es}, got {gs}")
    if len(bad) > 8:
        lines.append(f"  ... and {len(bad) - 8} more shape mismatches")
    raise ValueError("\n".join(lines))


def square_grid(rows: int, what: str, hint: str = "") -> tuple[int, int]:
    """(side, side) of a square grid of `rows` patches; else a ValueError saying `what` has `rows` patch rows."""
    side = math.isqrt(max(int(rows), 0))
    if side * side != rows:
        raise ValueError(f"{what} has {rows} patch rows, not a square grid{hint}.")
    return side, side


def patch_rows(model: ViT, table_rows: int) -> int:
    """Rows of a learned position table that belong to patches (the class token may have its own row)."""
    return int(table_rows) - int(model.has_class_token and model.cls_posemb)


def grid_of(params: Mapping, model: ViT, image_size=None) -> tuple[int, int]:
    """Patch grid (rows, cols): from `image_size` if given, else from a square learned position embedding."""
    if image_size is not None:
        h, w = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
        return h // model.patch_size[0], w // model.patch_size[1]
    if "pos_embedding" not in params:
        raise ValueError("The patch grid is unknown (no learned position embedding): pass image_size.")
    return square_grid(patch_rows(model, np.shape(params["pos_embedding"])[1]), "pos_embedding",
                       ": pass image_size=(height, width)")


def expected_shapes(model: ViT, grid: tuple[int, int]) -> dict:
    """The parameter shapes `model.init` creates for images of `grid` patches (abstract: no computation)."""
    x = jax.ShapeDtypeStruct((1, grid[0] * model.patch_size[0], grid[1] * model.patch_size[1], 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def check_params(params: Mapping, model: ViT, source: str, image_size=None) -> None:
    """Checks that `params` has exactly the keys and shapes `model` needs (clear error otherwise)."""
    exp = expected_shapes(model, grid_of(params, model, image_size))
    check_shapes(params, exp, source, what=f"the ViT ({describe(model)})")


def describe(model: ViT) -> str:
    return (f"width={model.width} depth={model.depth} mlp_dim={model.mlp_dim} num_heads={model.num_heads} "
            f"patch_size={tuple(model.patch_size)} pool_type={model.pool_type!r} class_token={model.has_class_token}"
            f" scan={model.scan}")


def model_fields(model: ViT) -> dict:
    """JSON-able ViT fields (the ones a converter needs to rebuild the model)."""
    out = {}
    for f in MODEL_FIELDS:
        v = getattr(model, f)
        out[f] = list(v) if isinstance(v, tuple) else v
    out["class_token"] = model.has_class_token
    return out


# ---------------------------------------------------------------------------------------------- inference
def infer_model(params: Mapping, **fields) -> ViT:
    """The ViT that `params` (big_vision names, either layout) belong to.

    Shapes determine width, depth, mlp_dim, num_heads, patch size, class token, pre-norm, patch bias, position
    embedding kind, registers, LayerScale, MAP head and classifier. `fields` supply what shapes cannot tell (act,
    ln_eps, attn_softcap, ..., default: big_vision's) and may include `variant` ('B/16'); a field that contradicts
    the parameters is an error. pool_type: 'map' with a MAPHead_0; else the given pool_type if it is
    'tok'/'gap'/'none', else 'none' (a MaskEmbed student, whose config still names its teacher's 'map', has no
    head).
    cls_posemb (CLIP): given, or True when the class token's position rows are N+1 for a square N.
    """
    fields = {k: v for k, v in fields.items() if v is not None}
    variant = fields.pop("variant", None)
    if variant:
        for k, v in decode_variant(variant).items():
            fields.setdefault(k, v)
    if isinstance(fields.get("patch_size"), int):
        fields["patch_size"] = (fields["patch_size"],) * 2
    if "patch_size" in fields:
        fields["patch_size"] = tuple(fields["patch_size"])
    unknown = set(fields) - set(ViT.__dataclass_fields__)
    if unknown:
        raise ValueError(f"Unknown ViT field(s) {sorted(unknown)}.")

    flat = flatten(params)
    if "embedding/kernel" not in flat:
        raise ValueError(f"Not big_vision ViT params: no 'embedding/kernel' (top-level keys: {sorted(params)}).")
    ph, pw, _, width = np.shape(flat["embedding/kernel"])
    scanned = is_scanned(params)
    blk = "Transformer/encoderblock/" if scanned else "Transformer/encoderblock_0/"
    try:
        qk = np.shape(flat[blk + "MultiHeadDotProductAttention_0/query/kernel"])
        mlp_dim = np.shape(flat[blk + "MlpBlock_0/Dense_0/kernel"])[-1]
    except KeyError as e:
        raise ValueError(f"Not big_vision ViT params: missing {e.args[0]!r}.") from None
    inferred = dict(
        width=int(width), depth=depth_of(params), mlp_dim=int(mlp_dim), num_heads=int(qk[-2]),
        patch_size=(int(ph), int(pw)), class_token="cls" in params, pre_norm="pre_norm" in params,
        patch_bias="embedding/bias" in flat, posemb="learn" if "pos_embedding" in params else "sincos2d",
        num_classes=int(np.shape(flat["head/kernel"])[-1]) if "head/kernel" in flat else None,
        num_registers=int(np.shape(params["registers"])[1]) if "registers" in params else 0,
    )
    for k in STRUCTURAL:
        if k in fields and fields[k] != inferred[k]:
            raise ValueError(f"Model field {k}={fields[k]!r} contradicts the parameters, which have {k}="
                             f"{inferred[k]!r}.")
    spec = dict(fields, **inferred, scan=scanned)
    if blk + "LayerScale_0" in flat:
        spec["layerscale_init"] = fields.get("layerscale_init") or LOADED_LAYERSCALE_INIT
    else:
        spec["layerscale_init"] = None
    if "MAPHead_0" in params:
        spec["pool_type"] = "map"
    elif fields.get("pool_type") not in ("tok", "gap", "none"):
        spec["pool_type"] = "none"
    if inferred["class_token"] and "cls_posemb" not in fields and inferred["posemb"] == "learn":
        rows = np.shape(params["pos_embedding"])[1]
        spec["cls_posemb"] = math.isqrt(rows) ** 2 != rows and math.isqrt(rows - 1) ** 2 == rows - 1
    return ViT(**spec)


# --------------------------------------------------------------------------------- position-table resizing
def _keys_cubic(x: float, a: float) -> float:
    """Keys' cubic convolution kernel with parameter `a` (torch: -0.75 plain, -0.5 with antialias)."""
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0


def _resize_weights(n_in: int, n_out: int, antialias: bool, mode: str = "bicubic") -> np.ndarray:
    """(n_out, n_in) weights of torch's `interpolate(mode=mode, align_corners=False)` along one axis.

    bicubic, antialias=False: Keys cubic convolution, a=-0.75, taps clamped at the border (upsample_bicubic2d).
    antialias=True: the PIL-style filters torch uses with antialias (bicubic a=-0.5, or the triangle of bilinear;
    support widened by the scale when shrinking, normalized). timm's checkpoint filter resizes position tables
    with bicubic+antialias (`resample_abs_pos_embed`), HF's SigLIP 2 with bilinear+antialias."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    if mode not in ("bicubic", "bilinear") or (mode == "bilinear" and not antialias):
        raise ValueError(f"Unsupported resize {mode!r} (antialias={antialias}); bicubic, or bilinear with antialias.")
    if not antialias:
        for i in range(n_out):
            src = (i + 0.5) * scale - 0.5
            j0 = int(np.floor(src))
            t = src - j0
            for j in range(j0 - 1, j0 + 3):
                w[i, min(max(j, 0), n_in - 1)] += _keys_cubic(j - j0 - t, -0.75)
        return w

    def kernel(x):
        return max(0.0, 1.0 - abs(x)) if mode == "bilinear" else _keys_cubic(x, -0.5)

    reach = 1.0 if mode == "bilinear" else 2.0
    support = reach * scale if scale >= 1 else reach
    invscale = 1.0 / scale if scale >= 1 else 1.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = np.array([kernel((j - center + 0.5) * invscale) for j in range(lo, hi)])
        w[i, lo:hi] = taps / taps.sum()
    return w


def resize_grid(table: np.ndarray, new_grid: tuple[int, int], antialias: bool = True,
                mode: str = "bicubic") -> np.ndarray:
    """(h, w, D) -> (new_h, new_w, D) by separable resampling, equal to torch's
    `F.interpolate(..., mode=mode, align_corners=False, antialias=antialias)` (computed in float64)."""
    table = np.asarray(table)
    wh = _resize_weights(table.shape[0], new_grid[0], antialias, mode)
    ww = _resize_weights(table.shape[1], new_grid[1], antialias, mode)
    out = np.einsum("ih,hwd,jw->ijd", wh, table.astype(np.float64), ww)
    return out.astype(table.dtype)


def resample_posemb(params: Mapping, model: ViT, new_grid: tuple[int, int], old_grid=None,
                    antialias: bool = True, mode: str = "bicubic") -> dict:
    """params with the learned position table resized to `new_grid` patches (bicubic, as timm's checkpoint filter
    and HF's DINOv2 `interpolate_pos_encoding` do; bilinear+antialias as HF's SigLIP 2; a class token's own row is
    kept as it is). E.g. DINOv2 checkpoints are 37x37 (518 px) and the reference trains them at 16x16 (224 px)."""
    if model.posemb != "learn":
        return dict(params)
    pos = np.asarray(params["pos_embedding"])
    k = int(model.has_class_token and model.cls_posemb)
    old_grid = tuple(old_grid) if old_grid is not None else grid_of(params, model)
    if tuple(old_grid) == tuple(new_grid):
        return dict(params)
    grid = pos[0, k:].reshape(*old_grid, pos.shape[-1])
    patches = resize_grid(grid, new_grid, antialias, mode).reshape(1, -1, pos.shape[-1])
    return dict(params, pos_embedding=np.concatenate([pos[:, :k], patches], axis=1))


def random_map_head(model: ViT, seed: int = 0) -> dict:
    """A freshly initialized MAPHead_0 for `model` (numpy)."""
    head = MAPHead(num_heads=model.num_heads, mlp_dim=model.mlp_dim, act=model.act, ln_eps=model.ln_eps)
    p = head.init(jax.random.key(seed), jnp.zeros((1, 1, model.width)))["params"]
    return to_numpy(p)


def take_map_head(head_params: Optional[Mapping]) -> Optional[dict]:
    """Accepts a MAPHead_0 subtree or a whole teacher params tree holding one."""
    if head_params is None:
        return None
    if "MAPHead_0" in head_params:
        head_params = head_params["MAPHead_0"]
    if "probe" not in head_params:
        raise ValueError(f"head_params is neither a MAPHead_0 tree nor params holding one (keys: "
                         f"{sorted(head_params)}).")
    return to_numpy(head_params)

