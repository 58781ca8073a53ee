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
detected, read, written); the functions here are the drivers over them, with the helpers the records share.

Model fields: HF configs, files lalign writes and lalign workdirs record the architecture; for the others the
parameter shapes give width, depth, mlp_dim, heads (not timm), patch size, class token, pre-norm, MAP head and
classifier. An orbax input's record is, nearest first, `PATH.model.json` (written by `lalign.export --to orbax`),
then `resolved.json` in a parent directory (a workdir: every field of the teacher and the student its run built,
written by lalign/pipeline.py), then the nearest `config.json` above PATH (a workdir written before resolved.json:
its "model" section, and for a student the MaskEmbed attn_softcap). `fields` must agree with what a checkpoint
records (a contradiction is a ValueError naming both values; `recorded_wins=True`, for a run's teacher, drops
them instead) except the compute choices (COMPUTE_FIELDS); what neither records nor `fields` give (activation,
LayerNorm eps, the heads of a timm file, pooling without a head) is big_vision's default.

Normalization: `checkpoint_normalization(path)` is the pixel normalization a checkpoint states (a HF
`preprocessor_config.json`, a timm `config.json` pretrained_cfg, an `open_clip_config.json` preprocess_cfg, a
workdir's record), mapped to lalign's names (lalign.data.images.NORMALIZATION), else its family's
(`family_normalization`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

from lalign import log
from lalign.checkpoints import verify
from lalign.checkpoints.common import grid_of, infer_model, resample_posemb
from lalign.checkpoints.manager import restore_arrays
from lalign.data.images import NORMALIZATION
from lalign.files import absolute
from lalign.models.vit import ViT, decode_variant

# `config.init_posemb_resize`: how a checkpoint's position table is resized to the run's patch grid (e.g. DINOv2's
# 37x37 at 518 px -> 16x16 at 224 px). 'bicubic_antialias' is what timm's checkpoint filter does (the reference
# loads its teachers through timm); 'bicubic' what HF's DINOv2 does at run time, 'bilinear_antialias' HF's
# SigLIP 2 (NaFlex); 'none' refuses another grid.
POSEMB_RESIZE = ("bicubic_antialias", "bicubic", "bilinear_antialias", "none")


# ------------------------------------------------------------------------------------------ drivers
def _formats():
    """lalign/checkpoints/formats.py, whose records each driver here looks up."""
    # imported on first use: the records are built on this module's helpers (formats.py imports it)
    from lalign.checkpoints import formats

    return formats


def guess_format(path: str) -> str:
    """The input format of the checkpoint at `path` (`formats.detect`)."""
    return _formats().detect(path)


def folder_weights(path: str, fmt: str) -> str:
    """The weights file of a timm / open_clip hub folder (timm's config.json names an "architecture"), else
    `path` as it is."""
    return _formats().reader(fmt).weights(path)


def records_model(path: str, fmt: Optional[str] = None) -> Optional[str]:
    """What records the whole model of the checkpoint at `path` (a file name), or None where the parameter
    shapes and the fields given make it (big_vision npz, timm / open_clip files not written by lalign, an orbax
    directory without a record)."""
    rec = _formats().reader(fmt or guess_format(path))
    return rec.records(rec.weights(path))


def load_any(path: str, fmt: Optional[str] = None, fields: Optional[dict] = None, *, tower: str = "img",
             quiet: bool = False, recorded_wins: bool = False) -> tuple[ViT, dict]:
    """(ViT, params) from a checkpoint in any supported format; see the module docstring for `fields` and
    `recorded_wins`."""
    rec = _formats().reader(fmt or guess_format(path))
    return rec.read(rec.weights(path), dict(fields or {}), tower=tower, quiet=quiet, recorded_wins=recorded_wins)


def load_with_decoder(path: str, fmt: Optional[str] = None, fields: Optional[dict] = None, *, tower: str = "img",
                      quiet: bool = False, params_only: bool = False) -> tuple[ViT, dict, Optional[dict]]:
    """`load_any`'s (ViT, params), and the MaskEmbed projection + decoder ({'proj', 'decoder'}) when the input is a
    training checkpoint (else None), from one read of the checkpoint. `params_only`: a training checkpoint step's
    params alone are read and verified (`restore_verified`)."""
    fmt = fmt or guess_format(path)
    rec = _formats().reader(fmt)
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
    rec = _formats().reader(fmt or guess_format(path))
    if rec.normalization is None:  # a format that states none: its family's, from the model read
        return family_normalization(load_any(path, rec.name, {}, tower=tower, quiet=True)[0])
    return rec.normalization(rec.weights(path), tower=tower)


RESOLVED = "resolved.json"  # in a workdir: the models and data its run resolved (lalign/pipeline.py writes it)
# ViT fields that say how a network is computed, not what it computes: a flag or config may always set them.
COMPUTE_FIELDS = ("scan", "remat_policy", "attention_impl", "dtype")


def vit_record(model: ViT) -> dict:
    """Every field of `model` as JSON values (dtype, a compute choice, left out): what a workdir records."""
    out = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name", "dtype"):  # flax's own fields, and the compute dtype
            continue
        v = getattr(model, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def workdir_record(path: str) -> dict:
    """What records the model of an orbax checkpoint at PATH, nearest first: {"kind": "sidecar", "source",
    "model", "normalization"} from `PATH.model.json`; {"kind": "resolved", "source", "record", "config"} from
    `resolved.json` in one of PATH's parents (up to 4 levels: a workdir); {"kind": "config", "source", "config"}
    from the nearest config.json with a "model" section (a workdir from before resolved.json); else {"kind": None}.
    "config" is the workdir's config.json (maskembed, data, init_from) where there is one."""
    own = path.rstrip("/") + ".model.json"
    if os.path.isfile(own):
        fields = read_json(own)
        return {"kind": "sidecar", "source": own, "normalization": fields.pop("normalization", None),
                "model": fields, "config": {}}
    d = os.path.abspath(path)
    for _ in range(4):
        d = os.path.dirname(d)
        resolved, config = os.path.join(d, RESOLVED), os.path.join(d, "config.json")
        cfg = read_json(config) if os.path.isfile(config) else {}
        if os.path.isfile(resolved):
            return {"kind": "resolved", "source": resolved, "record": read_json(resolved), "config": cfg}
        if isinstance(cfg.get("model"), dict):
            return {"kind": "config", "source": config, "config": cfg}
    return {"kind": None, "config": {}}


def _same(a, b) -> bool:
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return norm(a) == norm(b)


def contradictions(fields: dict, recorded: dict) -> list[str]:
    """'k=given (from variant V) where SOURCE records k=value' for each of `fields` (a `variant` counts as its
    sizes) that disagrees with `recorded` (a `vit_record`); compute choices never disagree."""
    given = {k: (v, None) for k, v in fields.items() if k != "variant" and v is not None}
    if fields.get("variant"):
        for k, v in decode_variant(fields["variant"]).items():
            given.setdefault(k, (v, fields["variant"]))
    if isinstance(given.get("patch_size", (None,))[0], int):
        given["patch_size"] = ((given["patch_size"][0],) * 2, given["patch_size"][1])
    if "class_token" in recorded and recorded.get("class_token") is None:  # None: implied by the pooling
        recorded = dict(recorded, class_token=recorded.get("pool_type") == "tok")
    out = []
    for k, (v, variant) in given.items():
        if k in COMPUTE_FIELDS or k not in recorded or _same(v, recorded[k]):
            continue
        why = f" (from variant {variant!r})" if variant else ""
        out.append(f"{k}={_short(v)}{why} where it records {k}={_short(recorded[k])}")
    return out


def _short(v):
    return repr(tuple(v) if isinstance(v, list) else v)


def agree_with_record(fields: dict, recorded: dict, source: str, recorded_wins: bool, quiet: bool) -> dict:
    """`fields` less those that contradict the record of `source`: refused (one line naming both values), or with
    `recorded_wins` dropped (and named unless quiet)."""
    bad = contradictions(fields, recorded)
    if not bad:
        return dict(fields)
    if not recorded_wins:
        raise ValueError(f"{source} records the model, and the model fields given contradict it: {'; '.join(bad)}. "
                         f"Drop those fields (--variant/--model/--num-heads, config.model): the record is what the "
                         f"checkpoint was trained as.")
    if not quiet:
        log.note(f"[load] {source} records the model; ignoring the contradicting fields: {'; '.join(bad)}")
    keep = {k: v for k, v in fields.items() if k in COMPUTE_FIELDS or k in recorded and _same(v, recorded[k])}
    return keep


def restore_verified(path: str, params_only: bool = False):
    """An orbax tree as numpy arrays; a training checkpoint step is verified against its checksum record.
    `params_only`: `{'params': ...}` of a training checkpoint step alone, verified against the record's entries for
    it, whatever the rest of the step holds (a quarantined step whose optimizer state is damaged)."""
    path = absolute(path)
    if os.path.isdir(os.path.join(path, "default")):  # a CheckpointManager step dir
        path = os.path.join(path, "default")
    record = verify.for_step_dir(path)
    if params_only and record is None:
        raise ValueError(f"--params-only: {path} has no checksum record to verify its params against (a training "
                         f"checkpoint step has checksums/<latest|best>/STEP.json, a quarantined one checksums.json).")
    if record is None and verify.saved_with_record(os.path.dirname(path)):
        raise ValueError(f"{path} was saved with a checksum record, and the record is missing: it cannot be verified "
                         f"(treated as damaged, as a resuming run treats it). Use another step.")
    tree = restore_arrays(path, only="params" if params_only else None)
    if record is not None:
        try:
            expected = verify.read(record)
            if params_only and expected is not None:
                expected = {k: v for k, v in expected.items() if k.startswith("params/")}
            problems = verify.mismatches(expected, verify.host_record(tree))
            why = "Its bytes changed after it was saved; use another step."
        except verify.RecordError as e:
            problems, why = [str(e)], "Nothing says what the step held; use another step."
        if problems:
            raise ValueError(f"{path} failed verification against {record}: {'; '.join(problems[:5])}. {why}")
    return tree


def unrecorded_fields(fields: dict, *also_recorded: str) -> dict:
    """The fields a state dict's shapes cannot tell (for timm and open_clip files): a variant gives its number of
    heads; the sizes the shapes record are dropped, with `also_recorded`."""
    f = dict(fields)
    variant = f.pop("variant", None)
    if variant:
        f.setdefault("num_heads", decode_variant(variant)["num_heads"])
    recorded = ("width", "depth", "mlp_dim", "patch_size", *also_recorded)
    return {k: v for k, v in f.items() if k not in recorded}


def restore_orbax(path: str, params_only: bool = False):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No orbax checkpoint directory at {path}.")
    return restore_verified(path, params_only)


def orbax_model(tree, path: str, fields: dict, quiet: bool, recorded_wins: bool = False) -> tuple[ViT, dict]:
    """(ViT, params) of a restored orbax tree: a params tree, or a training checkpoint's aligned student."""
    student = False
    if "params" in tree and isinstance(tree["params"], dict):
        tree = tree["params"]
    if "student" in tree:
        tree, student = tree["student"], True
    rec = workdir_record(path)
    recorded = None
    if rec["kind"] == "sidecar":
        recorded = rec["model"]
    elif rec["kind"] == "resolved":
        recorded = rec["record"].get("student" if student else "teacher")
    if recorded is not None:
        f = {k: v for k, v in recorded.items() if k != "scan"}  # the layout is the parameters'
        f.update(agree_with_record(fields, recorded, rec["source"], recorded_wins, quiet))
        if not quiet:
            log.note(f"[load] model from {rec['source']}" + (" (the aligned student)" if student else ""))
        return infer_model(tree, **f), tree
    f = {}
    if rec["kind"] == "config":
        cfg = rec["config"]
        f = _legacy_teacher_fields(cfg, rec["source"], quiet)
        if f is None:
            f = {k: v for k, v in cfg.get("model", {}).items() if k != "scan"}
            if not quiet:
                log.note(f"[load] model fields from {rec['source']}")
        if student:
            f["attn_softcap"] = (cfg.get("maskembed") or {}).get("attn_softcap")
            f["pool_type"] = "none"
    f.update(fields)
    return infer_model(tree, **f), tree


def _legacy_teacher_fields(cfg: dict, source: str, quiet: bool) -> Optional[dict]:
    """For a workdir from before resolved.json: the teacher's own record where its checkpoint records the model
    (a HF directory), whose config.json "model" section the run did not use; None where that section is what the
    run used (or the teacher is not here to tell)."""
    init = cfg.get("init_from") or ""
    if not init or init == "random" or "pretrain" in (cfg.get("stages") or ()):
        return None
    if not os.path.exists(init):
        if not quiet:
            log.note(f"[load] WARNING: {source} is from before {RESOLVED} and its teacher {init} is not here: the "
                     f"model fields are its config's, which a teacher that records its own model (a HF directory) "
                     f"overrode in training; check act and ln_eps, or pass them (--model)")
        return None
    fmt = cfg.get("init_format") or guess_format(init)
    if records_model(init, fmt) is None:
        return None
    teacher, _ = load_any(init, fmt, {}, quiet=True)
    if not quiet:
        log.note(f"[load] model fields from the teacher {init} that {source} names (its run took the model from "
                 f"there, not from the config's model section)")
    return {k: v for k, v in vit_record(teacher).items() if k not in ("scan", "pool_type", "num_classes")}


# ------------------------------------------------------------------------------------------ normalization
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
