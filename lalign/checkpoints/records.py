"""What a checkpoint or its workdir records about the model, and how the model fields given must agree with it.

HF configs, files lalign writes and lalign workdirs record the architecture. An orbax checkpoint's record is,
nearest first, `PATH.model.json` (written by `lalign.export --to orbax`), then `resolved.json` in a parent directory
(a workdir: every field of the teacher and the student its run built, written by lalign/pipeline.py), then the
nearest `config.json` above PATH (a workdir written before resolved.json: its "model" section, and for a student the
MaskEmbed attn_softcap): `workdir_record`. Fields given must agree with what a checkpoint records (a contradiction is
a ValueError naming both values; `recorded_wins=True`, for a run's teacher, drops them instead) except the compute
choices (COMPUTE_FIELDS): `agree_with_record`.
"""
from __future__ import annotations

import dataclasses
import json
import os

from lalign import log
from lalign.models.vit import ViT, decode_variant

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


def unrecorded_fields(fields: dict, *also_recorded: str) -> dict:
    """The fields a state dict's shapes cannot tell (for timm and open_clip files): a variant gives its number of
    heads; the sizes the shapes record are dropped, with `also_recorded`."""
    f = dict(fields)
    variant = f.pop("variant", None)
    if variant:
        f.setdefault("num_heads", decode_variant(variant)["num_heads"])
    recorded = ("width", "depth", "mlp_dim", "patch_size", *also_recorded)
    return {k: v for k, v in f.items() if k not in recorded}
