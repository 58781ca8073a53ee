"""Checkpoint formats as records in one table: how each is detected, read, written, and what it cannot hold.

    FORMATS["timm"].read(path, fields, tower="img", quiet=False, recorded_wins=False)  # -> (ViT, params)
    detect("model.safetensors")                                                       # -> "timm" or "open_clip"

A `Format` names its steps; `lalign.checkpoints.load` (`guess_format`, `load_any`, `load_with_decoder`,
`records_model`, `checkpoint_normalization`) and `lalign.export` (--from, --to, the decoder's place, the head
--head-from gives) are drivers that look a format up here and never name one. A new format is a record and its
functions registered here (`register(Format(...))`; code that imports this module may register one too), its
parameter names as a table of `mapping.Rule`s (as hf.py, timm.py, open_clip.py), and its tests. The records build on
`records` (the model a checkpoint or its workdir records, and the fields given checked against it), `normalization`
(lalign's names of the pixel statistics a checkpoint states) and `hub_files` (what an export writes beside weights).

Detection tries the records in the order they are registered; a `fallback` record (orbax: any directory) only
where no other claims the path.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from typing import Any, Callable, Optional

import jax
import numpy as np

from lalign import log
from lalign.checkpoints import bigvision, hf, hub_files, open_clip, timm, vlm
from lalign.checkpoints.common import check_params, flatten, infer_model, model_fields, open_safetensors, to_layout
from lalign.checkpoints.manager import restore_verified, save_params
from lalign.checkpoints.normalization import (AUTO_NORMALIZATION, family_normalization, family_of_names,
                                              named_normalization)
from lalign.checkpoints.records import (RESOLVED, agree_with_record, read_json, unrecorded_fields, vit_record,
                                        workdir_record)
from lalign.files import write_atomically, write_text
from lalign.models.vit import ViT


@dataclasses.dataclass
class Export:
    """What a format's `write` gets from `lalign.export`: the ViT, its params, where to write them (through
    `write_atomically`: never half an output) and the options; `written` is the export's JSON summary."""

    params: Any
    model: ViT
    output: str
    to: str
    input: str = ""
    written: dict = dataclasses.field(default_factory=dict)
    head: Any = None  # the teacher's pooling head (--head-from): its `Format.head` subtree
    dtype: Any = None
    image_size: Optional[int] = None
    kind: Optional[str] = None  # --kind (HF)
    drop_head: bool = False  # --no-head (HF SigLIP)
    scan: Optional[bool] = None  # None: as read
    source: Optional[hub_files.Source] = None  # what the hub files state (a hub-ready output)
    decoder: Optional[dict] = None  # the MaskEmbed decoder, for a format that writes it itself (writes_decoder)
    vlm: Optional[str] = None  # the VLM checkpoint whose vision tower the ViT replaces
    normalization: Callable[[], Optional[str]] = lambda: None  # the input's, where it has a lalign name


def _never(_path: str) -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class Format:
    """One checkpoint format. Input formats have `read` (and `detect` to be guessed), output formats `write`.

    detect(path) -> bool: the path is this format's (from its name and, for a file, its keys; cheap).
    read(path, fields, *, tower, quiet, recorded_wins) -> (ViT, params): `fields` and `recorded_wins` as in
      `load.load_any`; `path` is `weights(path)`.
    read_decoder(path, fields, *, tower, quiet, params_only) -> (ViT, params, decoder or None): a format that can
      hold the MaskEmbed decoder (a training checkpoint).
    weights(path) -> the file read for `path` (a hub folder's weights file).
    records(path) -> what records the whole model of the checkpoint (None: the shapes and the fields given make it).
    normalization(path, *, tower) -> (lalign normalization name, where it comes from).
    workdir(path) -> the record of the lalign run whose workdir holds the checkpoint (`records.workdir_record`;
      {"kind": None, "config": {}} for a format no run writes): its preprocessing and training for the hub files.
    write(Export): writes the output (staged, renamed into place) and notes what it wrote.
    problems(model) -> why a ViT cannot be written as this format (empty: it can).
    holds_softcap: its attention can hold the MaskEmbed attention soft-cap (else measured and dropped first).
    head: (parameter, what) a head-less student takes from --head-from.
    hub_folder(output) -> the output is a hub folder (hub files and the decoder inside it).
    decoder_suffix: the decoder's file beside a non-folder output, after the output's stem.
    writes_decoder: `write` writes the decoder (Export.decoder) into its own staged output; else it is saved at
      `decoder_path` once the output is in place.
    sidecars(output) -> the files written beside the output.
    takes_vlm: it writes into the VLM checkpoint --vlm.
    """

    name: str
    detect: Callable[[str], bool] = _never
    read: Optional[Callable[..., tuple]] = None
    read_decoder: Optional[Callable[..., tuple]] = None
    weights: Callable[[str], str] = lambda path: path
    records: Callable[[str], Optional[str]] = lambda path: None
    normalization: Optional[Callable[..., tuple]] = None
    workdir: Callable[[str], dict] = lambda path: {"kind": None, "config": {}}
    write: Optional[Callable[[Export], None]] = None
    problems: Callable[[ViT], list] = lambda model: []
    holds_softcap: bool = False
    head: tuple[str, str] = ("MAPHead_0", "MAP head (MAPHead_0)")
    hub_folder: Callable[[str], bool] = _never
    decoder_suffix: str = ".decoder.npz"
    writes_decoder: bool = False
    sidecars: Callable[[str], list] = lambda output: []
    takes_vlm: bool = False
    fallback: bool = False


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Adds `fmt` to FORMATS (a name registered again is replaced)."""
    FORMATS[fmt.name] = fmt
    return fmt


def inputs() -> tuple[str, ...]:
    """The formats lalign reads (--from)."""
    return tuple(name for name, f in FORMATS.items() if f.read is not None)


def outputs() -> tuple[str, ...]:
    """The formats lalign writes (--to)."""
    return tuple(name for name, f in FORMATS.items() if f.write is not None)


def reader(name: str) -> Format:
    """The record of input format `name`; another name is a ValueError naming the choices."""
    if name not in inputs():
        raise ValueError(f"Unknown input format {name!r}; choose from {inputs()}.")
    return FORMATS[name]


def writer(name: str) -> Format:
    """The record of output format `name`; another name is a ValueError naming the choices."""
    if name not in outputs():
        raise ValueError(f"Unknown output format {name!r}; choose from {outputs()}.")
    return FORMATS[name]


def detect(path: str) -> str:
    """The input format of the checkpoint at `path`: the first registered record that claims it, fallbacks last."""
    for fmt in sorted((FORMATS[n] for n in inputs()), key=lambda f: f.fallback):
        if fmt.detect(path):
            return fmt.name
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path}.")
    raise ValueError(f"Cannot tell the format of {path}: pass --from ({'/'.join(inputs())}).")


# ------------------------------------------------------------------------------------------ the decoder
def decoder_path(output: str, to: str) -> str:
    """Where the decoder goes beside the backbone: inside a hub folder output (`OUTPUT/maskembed_decoder.safetensors`,
    always for hf), else `OUTPUT_STEM` + the format's `decoder_suffix`."""
    fmt = writer(to)
    if fmt.hub_folder(output):
        return os.path.join(output, "maskembed_decoder.safetensors")
    stem = output[:-len(ext)] if (ext := os.path.splitext(output)[1]) in (".npz", ".safetensors") else output
    return stem.rstrip("/") + fmt.decoder_suffix


def save_decoder(decoder: dict, output: str, to: str) -> str:
    """Writes the decoder beside the backbone (the paper reuses it as the VLM adapter), with flat '/'-joined
    names, at `decoder_path(output, to)`."""
    flat = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten(decoder).items()}
    path = decoder_path(output, to)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file  # optional ([torch]/[test] extras): needed only here

        write_atomically(path, lambda tmp: save_file(flat, tmp), ".safetensors")
    else:
        write_atomically(path, lambda tmp: np.savez(tmp, **flat), ".npz")
    return path


# ------------------------------------------------------------------------------------------ hub folders
# hub folders `lalign.export --to timm|open_clip` writes (and timm / open_clip hub repos): (config, weights) names
HUB_FOLDERS = {"timm": ("config.json", "model.safetensors"),
               "open_clip": ("open_clip_config.json", "open_clip_model.safetensors")}


def _hub_folder_files(path: str, fmt: str) -> Optional[tuple[str, str]]:
    """(config, weights) of a `fmt` hub folder at `path` holding both, else None."""
    if not os.path.isdir(path):
        return None
    config, weights = (os.path.join(path, f) for f in HUB_FOLDERS[fmt])
    return (config, weights) if os.path.isfile(config) and os.path.isfile(weights) else None


def _hub_folder_weights(fmt: str, path: str) -> str:
    files = _hub_folder_files(path, fmt)
    return files[1] if files else path


def _is_safetensors(path: str, *, open_clip_names: bool) -> bool:
    """A .safetensors file whose names are open_clip's (`visual.*`, conv1, transformer.resblocks) or not."""
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        return False
    with open_safetensors(path) as f:
        return open_clip.is_open_clip(f.keys()) == open_clip_names


def _lalign_metadata(path: str) -> Optional[str]:
    """'PATH (its lalign metadata)' where a safetensors file lalign wrote records the model, else None."""
    with open_safetensors(path) as f:
        return f"{path} (its lalign metadata)" if "lalign_vit" in (f.metadata() or {}) else None


def _config_beside(path: str, name: str) -> tuple[str, dict]:
    """(path, contents or {}) of the file `name` beside the weights file `path`."""
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    return beside, (read_json(beside) if os.path.isfile(beside) else {})


# ------------------------------------------------------------------------------------------ orbax
def _restore_orbax(path: str, params_only: bool = False):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No orbax checkpoint directory at {path}.")
    return restore_verified(path, params_only)


def _orbax_model(tree, path: str, fields: dict, quiet: bool, recorded_wins: bool = False) -> tuple[ViT, dict]:
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
    fmt = reader(cfg.get("init_format") or detect(init))  # the teacher may be of any format in the table
    weights = fmt.weights(init)
    if fmt.records(weights) is None:
        return None
    teacher, _ = fmt.read(weights, {}, tower="img", quiet=True, recorded_wins=False)
    if not quiet:
        log.note(f"[load] model fields from the teacher {init} that {source} names (its run took the model from "
                 f"there, not from the config's model section)")
    return {k: v for k, v in vit_record(teacher).items() if k not in ("scan", "pool_type", "num_classes")}


def _read_orbax(path: str, fields: dict, *, tower: str = "img", quiet: bool = False, recorded_wins: bool = False):
    return _orbax_model(_restore_orbax(path), path, fields, quiet, recorded_wins)


def _read_orbax_decoder(path: str, fields: dict, *, tower: str = "img", quiet: bool = False,
                        params_only: bool = False):
    tree = _restore_orbax(path, params_only)
    model, params = _orbax_model(tree, path, fields, quiet)
    params_tree = tree["params"] if isinstance(tree.get("params"), dict) else tree
    decoder = ({"proj": params_tree["proj"], "decoder": params_tree["decoder"]}
               if "decoder" in params_tree and "proj" in params_tree else None)
    return model, params, decoder


def _orbax_records(path: str) -> Optional[str]:
    rec = workdir_record(path)
    return rec["source"] if rec["kind"] in ("sidecar", "resolved") else None


def _orbax_normalization(path: str, *, tower: str = "img") -> tuple[str, str]:
    """The normalization an orbax checkpoint's record states (its run trained with), else its family's."""
    rec = workdir_record(path)
    if rec["kind"] == "sidecar":
        if rec.get("normalization"):
            return rec["normalization"], rec["source"]
        return family_normalization(rec["model"])
    if rec["kind"] == "resolved":
        name = (rec["record"].get("data") or {}).get("normalization")
        if name:
            return name, f"{rec['source']} (what its run trained with)"
        return family_normalization(rec["record"].get("teacher") or {})
    cfg = rec["config"]
    name = (cfg.get("data") or {}).get("normalization")
    if name and name not in AUTO_NORMALIZATION:
        return name, f"{rec['source']} data.normalization (what its run trained with)"
    model, _ = _read_orbax(path, {}, quiet=True)
    return family_normalization(model)


def _model_json(output: str) -> str:
    return output.rstrip("/") + ".model.json"


def _params_to_write(job: Export):
    """(params in the layout asked for, cast to --dtype, scan): as strict as the hf/timm writers, exactly the
    tensors the model has, with its shapes."""
    check_params(to_layout(job.params, False), job.model.clone(scan=False), f"--input {job.input}", job.image_size)
    scan = job.model.scan if job.scan is None else job.scan
    params = to_layout(job.params, scan)
    if job.dtype is not None:
        params = jax.tree.map(lambda a: np.asarray(a).astype(job.dtype), params)
    return params, scan


def _write_orbax(job: Export) -> None:
    """A params dir, and OUTPUT.model.json: the model's fields and the normalization, read back by
    `records.workdir_record` (the probe, a run's init_from)."""
    params, scan = _params_to_write(job)
    write_atomically(job.output, lambda stage: save_params(stage, params))
    record = dict(model_fields(job.model), scan=scan)
    normalization = job.normalization()
    if normalization:
        record["normalization"] = normalization
    write_text(_model_json(job.output), json.dumps(record, indent=2))
    log.note(f"[export] wrote {job.to} params to {job.output}")


register(Format("orbax", detect=os.path.isdir, fallback=True, read=_read_orbax, read_decoder=_read_orbax_decoder,
                records=_orbax_records, normalization=_orbax_normalization, workdir=workdir_record, write=_write_orbax,
                holds_softcap=True, sidecars=lambda output: [_model_json(output)]))


# ------------------------------------------------------------------------------------------ big_vision
def _read_bigvision(path: str, fields: dict, *, tower: str = "img", quiet: bool = False,
                    recorded_wins: bool = False):
    params = bigvision.load_npz(path, tower=tower)
    return infer_model(params, **fields), params


def _bigvision_normalization(path: str, *, tower: str = "img") -> tuple[str, str]:
    with np.load(path, allow_pickle=False) as npz:
        names = list(npz.files)
    tower_names = [n for n in names if n.startswith((f"params/{tower}/", f"{tower}/"))]
    return family_normalization(family_of_names(tower_names or names))


def _write_bigvision(job: Export) -> None:
    params, _ = _params_to_write(job)
    write_atomically(job.output, lambda stage: bigvision.save_npz(stage, params))
    log.note(f"[export] wrote {job.to} params to {job.output}")


register(Format("bigvision", detect=lambda path: path.endswith(".npz") and not os.path.isdir(path),
                read=_read_bigvision, normalization=_bigvision_normalization, write=_write_bigvision,
                holds_softcap=True))


# ------------------------------------------------------------------------------------------ timm
def _is_timm(path: str) -> bool:
    """A .safetensors file without open_clip's names, or a timm hub folder (its config.json names an
    "architecture")."""
    files = _hub_folder_files(path, "timm")
    if files:
        return "architecture" in read_json(files[0])
    return _is_safetensors(path, open_clip_names=False)


def _read_timm(path: str, fields: dict, *, tower: str = "img", quiet: bool = False, recorded_wins: bool = False):
    if "lalign_vit" in timm.read_metadata(path):  # written by lalign: the file records the model
        model, params = timm.from_timm(path)
        agree_with_record(fields, vit_record(model), f"{path} (its lalign metadata)", recorded_wins, quiet)
        return model, params
    return timm.from_timm(path, **unrecorded_fields(fields))


def _timm_normalization(path: str, *, tower: str = "img") -> tuple[str, str]:
    """A timm hub config.json beside the file (pretrained_cfg mean / std), else the family's."""
    beside, cfg = _config_beside(path, "config.json")
    pc = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else cfg
    if "architecture" in cfg and "mean" in pc and "std" in pc:  # the layout of timm's hub repositories
        return named_normalization(pc["mean"], pc["std"], beside), f"{beside} pretrained_cfg mean/std"
    meta = timm.read_metadata(path)
    if "lalign_vit" in meta:
        return family_normalization(json.loads(meta["lalign_vit"]))
    with open_safetensors(path) as f:
        return family_normalization(family_of_names(f.keys()))


def _write_timm(job: Export) -> None:
    write_atomically(job.output, lambda stage: hub_files.export_timm(
        job.params, job.model, stage, job.source, head_params=job.head, image_size=job.image_size, dtype=job.dtype))
    log.note(f"[export] wrote timm state dict to {job.output} (timm kwargs in its metadata"
             f"{'; a timm hub config.json beside it' if hub_files.is_folder_output(job.output) else ''}; "
             f"lalign.checkpoints.timm.timm_model(path) builds the model)")


register(Format("timm", detect=_is_timm, read=_read_timm, weights=functools.partial(_hub_folder_weights, "timm"),
                records=_lalign_metadata, normalization=_timm_normalization, write=_write_timm,
                problems=timm.timm_problems, hub_folder=hub_files.is_folder_output,
                decoder_suffix=".decoder.safetensors"))


# ------------------------------------------------------------------------------------------ open_clip
def _is_open_clip(path: str) -> bool:
    """A .safetensors file with open_clip's names, or an open_clip hub folder."""
    return bool(_hub_folder_files(path, "open_clip")) or _is_safetensors(path, open_clip_names=True)


def _read_open_clip(path: str, fields: dict, *, tower: str = "img", quiet: bool = False,
                    recorded_wins: bool = False):
    return open_clip.from_open_clip(path, **unrecorded_fields(fields, "pool_type"))


def _open_clip_normalization(path: str, *, tower: str = "img") -> tuple[str, str]:
    beside, cfg = _config_beside(path, open_clip.CONFIG_FILE)
    pc = cfg.get("preprocess_cfg") or {}
    if "mean" in pc and "std" in pc:
        return named_normalization(pc["mean"], pc["std"], beside), f"{beside} preprocess_cfg mean/std"
    return "clip", "open_clip's default (OpenAI CLIP statistics)"


def _write_open_clip(job: Export) -> None:
    head = None if job.head is None else {"head": job.head}  # the teacher's projection
    write_atomically(job.output, lambda stage: hub_files.export_open_clip(job.params, job.model, stage, job.source,
                                                                         head_params=head, dtype=job.dtype))
    log.note(f"[export] wrote open_clip visual state dict to {job.output} (model_cfg in its metadata"
             f"{' and open_clip_config.json' if hub_files.is_folder_output(job.output) else ''}; "
             f"lalign.checkpoints.open_clip.open_clip_visual(path) builds the tower)")


register(Format("open_clip", detect=_is_open_clip, read=_read_open_clip,
                weights=functools.partial(_hub_folder_weights, "open_clip"), records=_lalign_metadata,
                normalization=_open_clip_normalization, write=_write_open_clip,
                problems=open_clip.open_clip_problems, head=("head", "projection (head)"),
                hub_folder=hub_files.is_folder_output, decoder_suffix=".decoder.safetensors"))


# ------------------------------------------------------------------------------------------ Hugging Face
def _is_hf(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))


def _read_hf(path: str, fields: dict, *, tower: str = "img", quiet: bool = False, recorded_wins: bool = False):
    model, params = hf.from_hf(path)
    agree_with_record(fields, vit_record(model), os.path.join(path, "config.json"), recorded_wins, quiet)
    return model, params


# the family of a HF model_type, where a folder has no preprocessor_config.json
HF_FAMILY_NORMALIZATION = (("dinov2", "imagenet"), ("clip", "clip"), ("siglip", "siglip"))


def _hf_normalization(path: str, *, tower: str = "img") -> tuple[str, str]:
    """preprocessor_config.json's image_mean / image_std, else the model_type's family's."""
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pre):
        p = read_json(pre)
        if p.get("do_normalize", True) is False:
            return named_normalization(0.0, 1.0, f"{pre} (do_normalize false)"), pre
        if "image_mean" in p and "image_std" in p:
            return named_normalization(p["image_mean"], p["image_std"], pre), f"{pre} image_mean/image_std"
    mt = read_json(os.path.join(path, "config.json")).get("model_type", "")
    for family, name in HF_FAMILY_NORMALIZATION:
        if mt.startswith(family):
            return name, f"{path}: model_type {mt!r} (no preprocessor_config.json)"
    raise ValueError(f"{path}: no preprocessor_config.json and model_type {mt!r} names no family; set "
                     f"config.data.normalization.")


def _write_hf(job: Export) -> None:
    """config.json + model.safetensors, the hub files, and the decoder inside the same staged folder."""
    def write(stage):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            job.written["hf"] = hf.to_hf(job.params, job.model, stage, kind=job.kind, head_params=job.head,
                                         drop_head=job.drop_head, image_size=job.image_size, dtype=job.dtype)
        hub_files.write_hf_files(stage, job.written["hf"], job.source)
        if job.decoder is not None:  # inside the output directory: part of the same swap
            save_decoder(job.decoder, stage, "hf")

    write_atomically(job.output, write)
    config = job.written.pop("hf")
    log.note(f"[export] wrote HF {config['architectures'][0]} to {job.output}; aligned per-token features: "
             f"{config['lalign']['features']}")


register(Format("hf", detect=_is_hf, read=_read_hf, records=lambda path: os.path.join(path, "config.json"),
                normalization=_hf_normalization, write=_write_hf,
                problems=lambda model: hf.hf_problems(model, hf.guess_kind(model)),
                hub_folder=lambda output: True, writes_decoder=True))


# ------------------------------------------------------------------------------------------ VLMs
def _write_vlm(job: Export, *, npz: bool) -> None:
    """The ViT as the vision tower of the VLM checkpoint job.vlm (a HF folder; a big_vision npz where `npz`)."""
    if vlm.is_npz(job.vlm):
        if not npz:
            raise ValueError(f"--vlm {job.vlm}: a big_vision npz is a PaliGemma checkpoint (--to paligemma).")
        write_atomically(job.output, lambda stage: job.written.update(vlm=vlm.write_npz_vlm(
            job.params, job.model, job.vlm, stage, head_params=job.head)))
    else:
        write_atomically(job.output, lambda stage: job.written.update(vlm=vlm.write_hf_vlm(
            job.params, job.model, job.vlm, stage, target=job.to, head_params=job.head)))
    log.note(f"[export] wrote {job.vlm} with the ViT as its vision tower to {job.output} "
             f"({job.written['vlm']['replaced']} tensors under {job.written['vlm']['prefix']}, the rest as it was)")


register(Format("paligemma", write=functools.partial(_write_vlm, npz=True), takes_vlm=True))
register(Format("llava", write=functools.partial(_write_vlm, npz=False), takes_vlm=True))
