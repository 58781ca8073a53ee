"""Any checkpoint lalign reads -> (ViT, params): one place for loading, used by the pipeline, probe, report and
export.

    model, params = load_any("siglip_b16_224.npz", None, {"variant": "B/16"})
    model, params = load_any("WORKDIR/checkpoints/best/2000", "orbax", {})   # the aligned student
    model, params, decoder = load_with_decoder("WORKDIR/checkpoints/best/2000")  # + its MaskEmbed decoder

Formats (guessed from the path when not given): `orbax` (a params dir written by `manager.save_params`, or a
training checkpoint step dir, verified against its checksum record), `bigvision` (.npz), `hf` (a directory with
config.json + model.safetensors), `timm` (.safetensors), `open_clip` (.safetensors with open_clip's
`visual.*` / `conv1`, `transformer.resblocks` names: a whole CLIP model's or its image tower's).

Model fields: HF configs and files lalign writes record the architecture; for the others the parameter shapes give
width, depth, mlp_dim, heads (not timm), patch size, class token, pre-norm, MAP head and classifier. What shapes
cannot tell (activation, LayerNorm eps, the heads of a timm file, pooling without a head) comes from, in order:
`fields`, then for orbax inputs `PATH.model.json` or the nearest `config.json` above PATH (a lalign workdir's
config: its "model" section, and for a student the MaskEmbed attn_softcap), else big_vision's defaults.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from lalign import log
from lalign.checkpoints import bigvision, hf, open_clip, timm, verify
from lalign.checkpoints.common import grid_of, infer_model, resample_posemb
from lalign.checkpoints.manager import restore_arrays
from lalign.files import absolute
from lalign.models.vit import ViT, decode_variant

FORMATS = ("orbax", "bigvision", "hf", "timm", "open_clip")
# `config.init_posemb_resize`: how a checkpoint's position table is resized to the run's patch grid (e.g. DINOv2's
# 37x37 at 518 px -> 16x16 at 224 px). 'bicubic_antialias' is what timm's checkpoint filter does (the reference
# loads its teachers through timm); 'bicubic' what HF's DINOv2 does at run time, 'bilinear_antialias' HF's
# SigLIP 2 (NaFlex); 'none' refuses another grid.
POSEMB_RESIZE = ("bicubic_antialias", "bicubic", "bilinear_antialias", "none")


def guess_format(path: str) -> str:
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")) and any(
                os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
            return "hf"
        return "orbax"
    if path.endswith(".npz"):
        return "bigvision"
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return "open_clip" if open_clip.is_open_clip(f.keys()) else "timm"
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path}.")
    raise ValueError(f"Cannot tell the format of {path}: pass --from ({'/'.join(FORMATS)}).")


def workdir_config(path: str) -> tuple[Optional[str], dict]:
    """(source, {"model": fields, ...}): `PATH.model.json`, else the nearest config.json with a "model" section
    in PATH's parents (up to 4 levels: a lalign workdir's config)."""
    own = path.rstrip("/") + ".model.json"
    if os.path.isfile(own):
        with open(own) as f:
            return own, {"model": json.load(f)}
    d = os.path.abspath(path)
    for _ in range(4):
        d = os.path.dirname(d)
        cand = os.path.join(d, "config.json")
        if os.path.isfile(cand):
            with open(cand) as f:
                cfg = json.load(f)
            if isinstance(cfg.get("model"), dict):
                return cand, cfg
    return None, {}


def restore_verified(path: str):
    """An orbax tree as numpy arrays; a training checkpoint step is verified against its checksum record."""
    path = absolute(path)
    if os.path.isdir(os.path.join(path, "default")):  # a CheckpointManager step dir
        path = os.path.join(path, "default")
    tree = restore_arrays(path)
    record = verify.for_step_dir(path)
    if record is not None:
        problems = verify.mismatches(verify.read(record), verify.host_record(tree))
        if problems:
            raise ValueError(f"{path} failed verification against {record}: {'; '.join(problems[:5])}. Its bytes "
                             f"changed after it was saved; use another step.")
    return tree


def load_any(path: str, fmt: Optional[str] = None, fields: Optional[dict] = None, *, tower: str = "img",
             quiet: bool = False) -> tuple[ViT, dict]:
    """(ViT, params) from a checkpoint in any supported format; see the module docstring for `fields`."""
    fields = dict(fields or {})
    fmt = fmt or guess_format(path)
    if fmt == "hf":
        if fields and not quiet:
            log.note(f"[load] {path}: the HF config defines the model; ignoring {sorted(fields)}")
        return hf.from_hf(path)
    if fmt == "timm":
        if "lalign_vit" in timm.read_metadata(path):  # written by lalign: the file records the model
            if fields and not quiet:
                log.note(f"[load] {path}: the file's metadata defines the model; ignoring {sorted(fields)}")
            return timm.from_timm(path)
        return timm.from_timm(path, **_unrecorded_fields(fields))
    if fmt == "open_clip":
        return open_clip.from_open_clip(path, **_unrecorded_fields(fields, "pool_type"))
    if fmt == "bigvision":
        params = bigvision.load_npz(path, tower=tower)
        return infer_model(params, **fields), params
    if fmt == "orbax":
        return _orbax_model(_restore_orbax(path), path, fields, quiet)
    raise ValueError(f"Unknown input format {fmt!r}; choose from {FORMATS}.")


def _unrecorded_fields(fields: dict, *also_recorded: str) -> dict:
    """The fields a state dict's shapes cannot tell (for timm and open_clip files): a variant gives its number of
    heads; the sizes the shapes record are dropped, with `also_recorded`."""
    f = dict(fields)
    variant = f.pop("variant", None)
    if variant:
        f.setdefault("num_heads", decode_variant(variant)["num_heads"])
    recorded = ("width", "depth", "mlp_dim", "patch_size", *also_recorded)
    return {k: v for k, v in f.items() if k not in recorded}


def load_with_decoder(path: str, fmt: Optional[str] = None, fields: Optional[dict] = None, *, tower: str = "img",
                      quiet: bool = False) -> tuple[ViT, dict, Optional[dict]]:
    """`load_any`'s (ViT, params), and the MaskEmbed projection + decoder ({'proj', 'decoder'}) when the input is a
    training checkpoint (else None), from one read of the checkpoint."""
    if (fmt or guess_format(path)) != "orbax":
        return (*load_any(path, fmt, fields, tower=tower, quiet=quiet), None)
    tree = _restore_orbax(path)
    model, params = _orbax_model(tree, path, dict(fields or {}), quiet)
    params_tree = tree["params"] if isinstance(tree.get("params"), dict) else tree
    decoder = ({"proj": params_tree["proj"], "decoder": params_tree["decoder"]}
               if "decoder" in params_tree and "proj" in params_tree else None)
    return model, params, decoder


def _restore_orbax(path: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No orbax checkpoint directory at {path}.")
    return restore_verified(path)


def _orbax_model(tree, path: str, fields: dict, quiet: bool) -> tuple[ViT, dict]:
    """(ViT, params) of a restored orbax tree: a params tree, or a training checkpoint's aligned student."""
    student = False
    if "params" in tree and isinstance(tree["params"], dict):
        tree = tree["params"]
    if "student" in tree:
        tree, student = tree["student"], True
    src, cfg = workdir_config(path)
    f = {k: v for k, v in cfg.get("model", {}).items() if k != "scan"}
    if student:
        f["attn_softcap"] = (cfg.get("maskembed") or {}).get("attn_softcap")
        f["pool_type"] = "none"
    if src and not quiet:
        log.note(f"[load] model fields from {src}")
    f.update(fields)
    return infer_model(tree, **f), tree


def fit_posemb(model, params, image_size: int, how: str):
    """params with the learned position table resized to `image_size`'s patch grid when the checkpoint's differs."""
    if how not in POSEMB_RESIZE:
        raise ValueError(f"config.init_posemb_resize={how!r}; choose from {POSEMB_RESIZE}.")
    if "pos_embedding" not in params:
        return params
    grid = (image_size // model.patch_size[0], image_size // model.patch_size[1])
    try:
        old = grid_of(params, model)
    except ValueError:
        return params  # not a square table: check_image_size names the mismatch
    if old == grid or how == "none":
        return params
    log.note(f"[load] position table resized {old[0]}x{old[1]} -> {grid[0]}x{grid[1]} patches for {image_size} px "
             f"images ({how})")
    return resample_posemb(params, model, grid, antialias=how.endswith("_antialias"), mode=how.split("_")[0])
