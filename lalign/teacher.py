"""A run's teacher: pre-trained here (the demo) or read from `config.init_from` in any format lalign reads, with
one log block saying which of its fields the checkpoint decided and which the config did."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lalign import files
from lalign.checkpoints.common import MODEL_FIELDS, STRUCTURAL, to_layout
from lalign.checkpoints.load import fit_posemb, guess_format, load_any, records_model
from lalign.checkpoints.records import COMPUTE_FIELDS, contradictions, vit_record
from lalign.log import info
from lalign.models.vit import decode_variant, vit_from_config
from lalign.pretrain import pretrain_teacher


def get_teacher(config, workdir: str):
    """(ViT, params) of the teacher: pre-trained here (demo) or read from `config.init_from` in any format the
    export tool reads (orbax params, big_vision npz, HF directory, timm safetensors; `config.init_format` names it
    where the path does not tell). A checkpoint that records its model (a HF directory, lalign's files and
    workdirs) decides every field but the compute choices (scan, remat_policy, attention_impl); for the others
    the parameter shapes decide the sizes and `config.model` what shapes cannot tell (act, ln_eps, ...). One block
    of the log says which field came from where."""
    if "pretrain" in config.stages:
        return pretrain_teacher(config, workdir)
    if not config.init_from:
        raise ValueError("config.init_from must name the teacher checkpoint when 'pretrain' is not a stage.")
    if config.init_from == "random":  # smoke tests and benchmarks only: nothing to align
        info("[teacher] init_from='random': a randomly initialized teacher (smoke tests, benchmarks)")
        model = vit_from_config(config, num_classes=None)
        size = config.data.image_size
        return model, jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, size, size, 3)))["params"]
    fields = {k: v for k, v in config.model.items() if v is not None and v != ""}
    scan = fields.pop("scan", None)
    source = teacher_source(config)
    model, params = load_any(config.init_from, source["format"], fields, quiet=True, recorded_wins=True)
    if scan is not None and scan != model.scan:  # e.g. a per-block npz into a scanned (memory-lean) model
        model, params = model.clone(scan=scan), to_layout(params, scan)
    for field in ("remat_policy", "attention_impl"):  # compute choices no checkpoint records
        if fields.get(field) not in (None, "") and getattr(model, field) != fields[field]:
            model = model.clone(**{field: fields[field]})
    params = fit_posemb(model, params, config.data.image_size, config.init_posemb_resize)
    if scan is not None:
        fields["scan"] = scan
    info(teacher_provenance(config.init_from, source, fields, model))
    return model, params


def teacher_source(config) -> dict:
    """Where the teacher of `config` comes from: {"path", "format", "recorded_by"} (recorded_by: the file that
    records its whole model, None when the parameter shapes and config.model make it)."""
    fmt = config.init_format or guess_format(config.init_from)
    return {"path": files.absolute(config.init_from), "format": fmt,
            "recorded_by": records_model(config.init_from, fmt)}


_SHAPE_FIELDS = (*STRUCTURAL, "cls_posemb", "layerscale_init")  # what a checkpoint's parameters show


def teacher_provenance(init_from: str, source: dict, fields: dict, model) -> str:
    """The log block saying which fields of the teacher the checkpoint decides and which config.model does."""
    rec = vit_record(model)
    arch = [k for k in MODEL_FIELDS if k != "scan"]

    def show(keys):
        return " ".join(f"{k}={tuple(rec[k]) if isinstance(rec[k], list) else rec[k]!r}" for k in keys) or "-"

    compute = " ".join(f"{k}={v!r}" for k, v in fields.items() if k in COMPUTE_FIELDS) or "-"
    lines = [f"[teacher] {init_from} ({source['format']}): ViT width {model.width}, depth {model.depth}, heads "
             f"{model.num_heads}, patch {model.patch_size[0]}, pool {model.pool_type}, act {model.act}"]
    if source["recorded_by"]:
        ignored = contradictions({k: v for k, v in fields.items() if k not in COMPUTE_FIELDS}, rec)
        lines += [f"  the checkpoint decides ({source['recorded_by']}): {show(arch)}",
                  f"  config.model ignored (the checkpoint decides): {'; '.join(ignored) or '-'}",
                  f"  config.model decides (compute choices): {compute}"]
    else:
        given = set(fields) | (set(decode_variant(fields["variant"])) if fields.get("variant") else set())
        shown = (*_SHAPE_FIELDS, "pool_type") if model.pool_type == "map" else _SHAPE_FIELDS  # a MAP head is seen
        shapes = [k for k in arch if k in shown and not (k == "num_heads" and k in given
                                                         and source["format"] == "timm")]
        configured = [k for k in arch if k not in shapes and k in given]
        defaults = [k for k in arch if k not in shapes and k not in given]
        lines += [f"  the parameter shapes decide: {show(shapes)}",
                  f"  config.model decides: {show(configured)}; compute choices: {compute}",
                  f"  neither records (defaults): {show(defaults)}"]
    return "\n".join(lines)
