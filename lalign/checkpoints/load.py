"""Any checkpoint lalign reads -> (ViT, params): one place for loading, used by the pipeline, probe, report and
export.

    model, params = load_any("siglip_b16_224.npz", None, {"variant": "B/16"})
    model, params = load_any("WORKDIR/checkpoints/best/2000", "orbax", {})   # the aligned student
    model, params, decoder = load_with_decoder("WORKDIR/checkpoints/best/2000")  # + its MaskEmbed decoder

Formats (guessed from the path when not given): `orbax` (a params dir written by `manager.save_params`, or a
training checkpoint step dir, verified against its checksum record), `bigvision` (.npz), `hf` (a directory with
config.json + model.safetensors), `timm` (.safetensors), `open_clip` (.safetensors with open_clip's
`visual.*` / `conv1`, `transformer.resblocks` names: a whole CLIP model's or its image tower's); a timm or
open_clip hub folder (`formats.HUB_FOLDERS`: timm's config.json + model.safetensors, open_clip_config.json +
open_clip_model.safetensors) reads as its weights file. Each format is a record in `formats.FORMATS` (how it is
detected, read, written); the functions here are the drivers over them, and the position table fitted to a run's
grid (`fit_posemb`).

Model fields: HF configs, files lalign writes and lalign workdirs record the architecture (`records.workdir_record`:
an orbax input's `PATH.model.json`, its workdir's `resolved.json` or `config.json`); for the others the parameter
shapes give width, depth, mlp_dim, heads (not timm), patch size, class token, pre-norm, MAP head and classifier.
`fields` must agree with what a checkpoint records (a contradiction is a ValueError naming both values;
`recorded_wins=True`, for a run's teacher, drops them instead) except the compute choices
(`records.COMPUTE_FIELDS`); what neither records nor `fields` give (activation, LayerNorm eps, the heads of a timm
file, pooling without a head) is big_vision's default.

Normalization: `checkpoint_normalization(path)` is the pixel normalization a checkpoint states (a HF
`preprocessor_config.json`, a timm `config.json` pretrained_cfg, an `open_clip_config.json` preprocess_cfg, a
workdir's record), mapped to lalign's names (lalign.data.images.NORMALIZATION), else its family's
(`normalization.family_normalization`).
"""
from __future__ import annotations

from typing import Optional

from lalign import log
from lalign.checkpoints import formats
from lalign.checkpoints.common import grid_of, resample_posemb
from lalign.checkpoints.normalization import family_normalization
from lalign.models.vit import ViT

# `config.init_posemb_resize`: how a checkpoint's position table is resized to the run's patch grid (e.g. DINOv2's
# 37x37 at 518 px -> 16x16 at 224 px). 'bicubic_antialias' is what timm's checkpoint filter does (the reference
# loads its teachers through timm); 'bicubic' what HF's DINOv2 does at run time, 'bilinear_antialias' HF's
# SigLIP 2 (NaFlex); 'none' refuses another grid.
POSEMB_RESIZE = ("bicubic_antialias", "bicubic", "bilinear_antialias", "none")


# ------------------------------------------------------------------------------------------ drivers
def guess_format(path: str) -> str:
    """The input format of the checkpoint at `path` (`formats.detect`)."""
    return formats.detect(path)


def records_model(path: str, fmt: Optional[str] = None) -> Optional[str]:
    """What records the whole model of the checkpoint at `path` (a file name), or None where the parameter
    shapes and the fields given make it (big_vision npz, timm / open_clip files not written by lalign, an orbax
    directory without a record)."""
    rec = formats.reader(fmt or guess_format(path))
    return rec.records(rec.weights(path))


def load_any(path: str, fmt: Optional[str] = None, fields: Optional[dict] = None, *, tower: str = "img",
             quiet: bool = False, recorded_wins: bool = False) -> tuple[ViT, dict]:
    """(ViT, params) from a checkpoint in any supported format; see the module docstring for `fields` and
    `recorded_wins`."""
    rec = formats.reader(fmt or guess_format(path))
    return rec.read(rec.weights(path), dict(fields or {}), tower=tower, quiet=quiet, recorded_wins=recorded_wins)


def load_with_decoder(path: str, fmt: Optional[str] = None, fields: Optional[dict] = None, *, tower: str = "img",
                      quiet: bool = False, params_only: bool = False) -> tuple[ViT, dict, Optional[dict]]:
    """`load_any`'s (ViT, params), and the MaskEmbed projection + decoder ({'proj', 'decoder'}) when the input is a
    training checkpoint (else None), from one read of the checkpoint. `params_only`: a training checkpoint step's
    params alone are read and verified (`manager.restore_verified`)."""
    fmt = fmt or guess_format(path)
    rec = formats.reader(fmt)
    if rec.read_decoder is None:
        if params_only:
            raise ValueError(f"--params-only reads a training checkpoint step (orbax); {path} is {fmt}.")
        return (*load_any(path, fmt, fields, tower=tower, quiet=quiet), None)
    return rec.read_decoder(rec.weights(path), dict(fields or {}), tower=tower, quiet=quiet, params_only=params_only)


def checkpoint_normalization(path: str, fmt: Optional[str] = None, *, tower: str = "img") -> tuple[str, str]:
    """(lalign normalization name, where it comes from) that the checkpoint at `path` states: a HF directory's
    preprocessor_config.json image_mean / image_std; a timm file's config.json beside it (pretrained_cfg mean /
    std); open_clip_config.json's preprocess_cfg; an orbax checkpoint's record (the normalization its run trained
    with). Where none is stated: its family's (`family_normalization`; HF: the model_type's, open_clip: CLIP's).
    Reads no weights except for an orbax directory without any record, or a format whose record has no
    `normalization`."""
    rec = formats.reader(fmt or guess_format(path))
    if rec.normalization is None:  # a format that states none: its family's, from the model read
        return family_normalization(load_any(path, rec.name, {}, tower=tower, quiet=True)[0])
    return rec.normalization(rec.weights(path), tower=tower)


# ------------------------------------------------------------------------------------------ the run's grid
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
             f"images ({how}{', as timm' if how == 'bicubic_antialias' else ''})")
    return resample_posemb(params, model, grid, antialias=how.endswith("_antialias"), mode=how.split("_")[0])
