"""A ViT placed into the vision tower of an existing vision-language model checkpoint; every other tensor untouched.

    write_hf_vlm(params, model, "paligemma-3b-pt-224/", "out/", target="paligemma")
    write_npz_vlm(params, model, "pt_224.npz", "out.npz")

Hugging Face VLMs (`PaliGemmaForConditionalGeneration`, `LlavaForConditionalGeneration`,
`LlavaOnevisionForConditionalGeneration`, with a SigLIP or CLIP vision tower): the ViT's tensors come from
`hf.to_hf_state_dict` (a SiglipVisionModel / CLIPVisionModel state dict) and go under the prefix the checkpoint keeps
its tower at, read from its keys: `vision_tower.vision_model.` (the released checkpoints, transformers 4.x),
`vision_tower.` (transformers 5's `save_pretrained`) or `model.vision_tower.[vision_model.]`. Each safetensors file
(one, or the shards an index.json names) is copied byte for byte and only the tower's byte ranges are overwritten,
in the dtype the checkpoint stores: every other tensor, the header and its metadata stay bit-identical, and the
index stays valid. Every other file of the folder (config, tokenizer, processor, generation config) is copied as
it is.

big_vision PaliGemma npz: the image tower's entries (`params/img/...` or `img/...`, per-block or scanned, as
stored) are replaced by the ViT's; `img/head` (the projection into the language model, not part of the tower) and
everything else are kept as stored.

The ViT must fit the tower exactly, or a ValueError names the field (width, depth, heads, patch size, image size /
position rows, MLP dim, activation, LayerNorm eps, pooling head) with the tower's value and the ViT's: every tensor
of the tower is replaced (none left over, none extra). A tower with a MAP head (SigLIP `vision_use_head`, unused by
the VLM but present in its checkpoint) needs the ViT's own head or `head_params` (the teacher's); a ViT head the
tower has no place for (PaliGemma's tower has none) is not written.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Mapping, Optional

import ml_dtypes
import numpy as np

from lalign import log
from lalign.checkpoints import hf, hub
from lalign.checkpoints.common import check_params, flatten, take_map_head, to_layout, to_numpy
from lalign.models.vit import ViT

TARGETS = {"paligemma": ("paligemma",), "llava": ("llava", "llava_onevision")}
VISION_KINDS = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}
# the tower a VLM config builds where its vision_config names no model_type
VISION_DEFAULT = {"paligemma": "siglip_vision_model", "llava": "clip_vision_model",
                  "llava_onevision": "siglip_vision_model"}
# the HF vision config classes' defaults, for keys a VLM's config.json leaves out
DEFAULTS = {
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
}
# (config key, field name in errors)
FIELDS = (("hidden_size", "width"), ("num_hidden_layers", "depth"), ("num_attention_heads", "heads"),
          ("patch_size", "patch size"), ("image_size", "image size"), ("intermediate_size", "MLP dim"))
SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "F64": np.dtype(np.float64),
                      "BF16": np.dtype(ml_dtypes.bfloat16)}
POSITION_IDS = "embeddings.position_ids"  # a buffer (0..N-1) that older checkpoints store: kept
# a VLM's hub repo: weights and configs, and the tokenizer and chat template the copy keeps
HUB_FILES = (*hub.HUB_FILES, "*.model", "*.jinja", "*.tiktoken")


# ------------------------------------------------------------------------------------------ safetensors
def read_header(path: str) -> tuple[dict, int]:
    """(header of a safetensors file, offset of its data): tensors by name with dtype, shape and data_offsets."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n < 1 << 30 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a readable safetensors file (its header cannot be read).")
    return header, 8 + n


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a HF model folder: model.safetensors, or the shards its index names."""
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return ["model.safetensors"]
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    raise FileNotFoundError(f"{folder}: no model.safetensors (or model.safetensors.index.json); PyTorch .bin "
                            f"files are not read (re-save with safe_serialization=True).")


def tower_prefix(keys, where: str) -> str:
    """The prefix of the vision tower's tensors, read from the checkpoint's keys."""
    anchors = [k for k in keys if k.endswith("embeddings.patch_embedding.weight") and "vision_tower." in k]
    if len(anchors) != 1:
        raise ValueError(f"{where}: expected one vision tower (a '...vision_tower.[vision_model.]embeddings."
                         f"patch_embedding.weight' tensor), found {len(anchors)}: {sorted(anchors)[:4]}.")
    return anchors[0][:-len("embeddings.patch_embedding.weight")]


# ------------------------------------------------------------------------------------------------ fit
def _mismatch(where: str, field: str, expected, actual) -> ValueError:
    return ValueError(f"{where}: the ViT does not fit the VLM's vision tower: {field} is {expected} in the tower, "
                      f"{actual} in the ViT.")


def check_fit(vision_config: dict, kind: str, student: dict, where: str) -> None:
    """The ViT's HF vision config (`to_hf_state_dict`'s) against the tower's, field by field."""
    c = dict(DEFAULTS[kind], **{k: v for k, v in vision_config.items() if v is not None})
    for key, field in FIELDS:
        want, got = c[key], student[key]
        want = want[0] if isinstance(want, (list, tuple)) and len(set(want)) == 1 else want
        if want != got:
            raise _mismatch(where, f"{field} ({key})", want, got)
    act = hf.ACT_FROM_HF.get(c["hidden_act"])
    if act is None:
        raise ValueError(f"{where}: the tower's hidden_act {c['hidden_act']!r} has no lalign equivalent "
                         f"(supported: {sorted(hf.ACT_FROM_HF)}).")
    if act != hf.ACT_FROM_HF[student["hidden_act"]]:
        raise _mismatch(where, "activation (hidden_act)", c["hidden_act"], student["hidden_act"])
    if not np.isclose(float(c["layer_norm_eps"]), float(student["layer_norm_eps"]), rtol=1e-6, atol=0):
        raise _mismatch(where, "LayerNorm eps (layer_norm_eps)", c["layer_norm_eps"], student["layer_norm_eps"])


def _same_tensors(tower: Mapping, ours: Mapping, where: str, name: str = "tensor") -> None:
    """Exactly the tower's tensors with its shapes: none left over, none extra."""
    left, extra = sorted(set(tower) - set(ours)), sorted(set(ours) - set(tower))
    if left:
        raise ValueError(f"{where}: the vision tower's {name}(s) {left[:6]} have no counterpart in the ViT, "
                         f"which would leave them as they were.")
    if extra:
        raise ValueError(f"{where}: the ViT's {name}(s) {extra[:6]} have no place in the VLM's vision tower.")
    for k in tower:
        if tuple(tower[k]) != tuple(np.shape(ours[k])):
            raise ValueError(f"{where}: {k} has shape {tuple(tower[k])} in the vision tower, "
                             f"{tuple(np.shape(ours[k]))} from the ViT.")


def _with_head(params: Mapping, model: ViT, tower_has_head: bool, head_params, where: str):
    """(params, model) with the pooling head the tower has: the ViT's, the given one, or none."""
    has = "MAPHead_0" in params
    if tower_has_head and not has and head_params is None:
        raise ValueError(f"{where}: the VLM's vision tower has a MAP head (head.*, vision_use_head) and the ViT has "
                         f"none (pooling head: present in the tower, absent in the ViT); pass --head-from TEACHER to "
                         f"write the teacher's.")
    if not tower_has_head and has:
        log.note("[export] the VLM's vision tower has no pooling head: the ViT's MAP head is not written.")
        params = {k: v for k, v in params.items() if k != "MAPHead_0"}
        model = model.clone(pool_type="none")
    return params, model


# ------------------------------------------------------------------------------------------ HF folders
def read_hf_vlm(folder: str, target: str) -> dict:
    """What the swap needs of a HF VLM folder: its config, vision kind, weight files with their headers, and the
    tower's prefix and tensors (name without prefix -> (file, shape))."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"--vlm {folder}: no config.json (expected a Hugging Face VLM folder).")
    with open(cfg_path) as f:
        config = json.load(f)
    mt = config.get("model_type")
    if mt not in TARGETS[target]:
        raise ValueError(f"--vlm {folder}/config.json: model_type {mt!r}, expected {' or '.join(TARGETS[target])} "
                         f"for --to {target}.")
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        raise ValueError(f"--vlm {folder}/config.json: no vision_config, which the tower's fit is checked against.")
    vision_type = vision.get("model_type", VISION_DEFAULT[mt])
    kind = VISION_KINDS.get(vision_type)
    if kind is None:
        raise ValueError(f"--vlm {folder}/config.json: vision_config.model_type {vision_type!r}, expected one of "
                         f"{sorted(VISION_KINDS)}.")
    files = weight_files(folder)
    headers = {fn: read_header(os.path.join(folder, fn)) for fn in files}
    keys = {k: fn for fn, (h, _) in headers.items() for k in h if k != "__metadata__"}
    prefix = tower_prefix(keys, f"--vlm {folder}")
    tower = {k[len(prefix):]: (fn, headers[fn][0][k]["shape"]) for k, fn in keys.items() if k.startswith(prefix)}
    return dict(config=config, vision=vision, kind=kind, files=files, headers=headers, prefix=prefix, tower=tower)


def hf_tower_tensors(params: Mapping, model: ViT, vlm: dict, where: str, head_params=None) -> dict:
    """The ViT as the tower's tensors (names without the tower prefix), checked to fit it exactly."""
    tower = vlm["tower"]
    tower_head = any(k.startswith("head.") for k in tower)
    params, model = _with_head(dict(params), model, tower_head, head_params, where)
    kind = vlm["kind"]
    why = hf.hf_problems(model, kind)
    if why:
        raise ValueError(f"{where}: the ViT cannot be a HF {kind} vision tower: " + "; ".join(why) + ".")
    sd, config = hf.to_hf_state_dict(params, model, kind, head_params=head_params, drop_head=not tower_head)
    check_fit(vlm["vision"], kind, config, where)
    sd = {k[len(hf.P):] if k.startswith(hf.P) else k: v for k, v in sd.items()}
    shapes = {k: shape for k, (_, shape) in tower.items() if k != POSITION_IDS}
    _same_tensors(shapes, sd, where)
    if POSITION_IDS in tower:  # a buffer: its length must be the ViT's number of positions
        rows = sd["embeddings.position_embedding.weight"].shape[0]
        if tuple(tower[POSITION_IDS][1])[-1] != rows:
            raise _mismatch(where, f"position rows ({POSITION_IDS})", tuple(tower[POSITION_IDS][1])[-1], rows)
    return sd


def _copy_folder(src: str, dst: str, skip) -> None:
    """Every file and folder of `src` (symlinks followed, as in a hub snapshot) into `dst`, but `skip`."""
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        if name in skip:
            continue
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s):
            shutil.copytree(s, d)
        else:
            shutil.copyfile(s, d)


def write_hf_vlm(params: Mapping, model: ViT, folder: str, output: str, *, target: str, head_params=None) -> dict:
    """Writes `output` (a new folder): `folder`'s VLM with the ViT as its vision tower (module docstring). Returns
    {prefix, kind, replaced, files}."""
    where = f"--vlm {folder}"
    vlm = read_hf_vlm(folder, target)
    sd = hf_tower_tensors(params, model, vlm, where, head_params)
    _copy_folder(folder, output, skip=set(vlm["files"]))
    by_file: dict[str, list[str]] = {}
    for k, (fn, _) in vlm["tower"].items():
        if k != POSITION_IDS:
            by_file.setdefault(fn, []).append(k)
    for fn in vlm["files"]:
        header, start = vlm["headers"][fn]
        dst = os.path.join(output, fn)
        shutil.copyfile(os.path.join(folder, fn), dst)
        with open(dst, "r+b") as f:
            for k in by_file.get(fn, []):
                entry = header[vlm["prefix"] + k]
                dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise ValueError(f"{where}/{fn}: {vlm['prefix'] + k} is stored as {entry['dtype']}; only "
                                     f"{sorted(SAFETENSORS_DTYPES)} towers are written.")
                data = np.ascontiguousarray(np.asarray(sd[k], np.float32).astype(dtype)).tobytes()
                begin, end = entry["data_offsets"]
                assert len(data) == end - begin, k  # shapes and dtypes checked above
                f.seek(start + begin)
                f.write(data)
    features = describe_features(vlm["config"], vlm["kind"])
    if features:
        log.note(f"[export] {features}")
    return dict(prefix=vlm["prefix"], kind=vlm["kind"], replaced=len(sd), files=vlm["files"])


# ------------------------------------------------------------------------------------- big_vision npz
def _npz_prefix(keys, path: str) -> str:
    for prefix in ("params/img/", "img/"):
        if any(k.startswith(prefix + "embedding/") for k in keys):
            return prefix
    raise ValueError(f"--vlm {path}: no image tower (params/img/embedding/... or img/embedding/...) in this npz; "
                     f"first keys: {sorted(keys)[:6]}.")


def _npz_fields(shapes: Mapping) -> dict:
    """Width, depth, heads, patch, position rows and MLP dim of big_vision ViT entries (either layout), from their
    shapes."""
    scanned = "Transformer/encoderblock/MlpBlock_0/Dense_0/kernel" in shapes
    block = "Transformer/encoderblock/" if scanned else "Transformer/encoderblock_0/"
    lead = 1 if scanned else 0
    get = lambda name, i: (tuple(shapes[name]) + (0,) * 5)[i] if name in shapes else 0  # noqa: E731
    depth = shapes[block + "MlpBlock_0/Dense_0/kernel"][0] if block + "MlpBlock_0/Dense_0/kernel" in shapes and \
        scanned else len({k.split("/")[1] for k in shapes if k.startswith("Transformer/encoderblock_")})
    kernel = tuple(shapes.get("embedding/kernel", (0, 0, 0, 0)))
    return {"width": kernel[-1], "patch size": kernel[:2], "depth": depth,
            "heads": get(block + "MultiHeadDotProductAttention_0/query/kernel", lead + 1),
            "MLP dim": get(block + "MlpBlock_0/Dense_0/kernel", lead + 1),
            "position rows": get("pos_embedding", 1)}


def write_npz_vlm(params: Mapping, model: ViT, path: str, output: str, head_params=None) -> dict:
    """Writes `output` (.npz): the big_vision PaliGemma npz `path` with the ViT's params in place of its image
    tower's (module docstring). Returns {prefix, scan, replaced}."""
    where = f"--vlm {path}"
    with np.load(path, allow_pickle=False) as f:
        raw = {k: f[k] for k in f.files}  # as stored: bfloat16 stays numpy's void V2, bit for bit
    prefix = _npz_prefix(raw, path)
    tower = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix) and not
             k[len(prefix):].startswith("head/")}  # img/head: the projection into the language model
    scan = any(k.startswith("Transformer/encoderblock/") for k in tower)
    if model.attn_softcap is not None:
        raise ValueError(f"{where}: big_vision's PaliGemma ViT has no attention soft-cap "
                         f"(attn_softcap={model.attn_softcap}).")
    if model.act != "gelu" or not np.isclose(float(model.ln_eps), 1e-6, rtol=1e-6):
        field, want, got = ("activation", "gelu", model.act) if model.act != "gelu" else \
            ("LayerNorm eps", 1e-6, model.ln_eps)
        raise _mismatch(where, field, want, got)
    params = to_numpy(params)
    tower_head = any(k.startswith("MAPHead_0/") for k in tower)
    params, model = _with_head(params, model, tower_head, head_params, where)
    if tower_head and "MAPHead_0" not in params:
        params, model = dict(params, MAPHead_0=take_map_head(head_params)), model.clone(pool_type="map")
    if "head" in params:
        log.note("[export] the ViT's classifier head is not written (img/head is the VLM's projection).")
        params = {k: v for k, v in params.items() if k != "head"}
        model = model.clone(num_classes=0)
    check_params(to_layout(params, False), model.clone(scan=False), "the ViT's params")
    ours = flatten(to_layout(params, scan))
    theirs, mine = _npz_fields({k: v.shape for k, v in tower.items()}), _npz_fields({k: np.shape(v) for k, v in
                                                                                      ours.items()})
    for field, want in theirs.items():
        if want != mine[field]:
            raise _mismatch(where, field, want, mine[field])
    _same_tensors({k: v.shape for k, v in tower.items()}, ours, where, "entry")
    out = dict(raw)
    for k, stored in tower.items():
        value = np.asarray(ours[k], np.float32)
        if stored.dtype.kind == "V" and stored.dtype.itemsize == 2:  # bfloat16 as numpy stores it
            out[prefix + k] = value.astype(ml_dtypes.bfloat16).view(stored.dtype)
        else:
            out[prefix + k] = value.astype(stored.dtype)
    with open(output, "wb") as f:  # np.savez given a name would add .npz to it
        np.savez(f, **out)
    return dict(prefix=prefix, scan=scan, replaced=len(tower))


def is_npz(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".npz")


def describe_features(vlm_config: Optional[dict], kind: str) -> str:
    """Which output of the tower a HF VLM reads, beside the aligned features (hf module docstring)."""
    if not vlm_config or vlm_config.get("model_type") == "paligemma":
        return "PaliGemma reads the tower's last_hidden_state: the aligned features" if kind == "siglip" else ""
    layer = vlm_config.get("vision_feature_layer", -2 if vlm_config.get("model_type") == "llava" else -1)
    aligned = "last_hidden_state" if kind == "siglip" else "post_layernorm(last_hidden_state)"
    return (f"the VLM reads the tower's hidden_states[{layer}] (vision_feature_layer, before the final LayerNorm); "
            f"the aligned features are {aligned}")
