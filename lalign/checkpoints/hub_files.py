"""The files beside exported weights that make an export hub-ready: what the libraries read to preprocess images
and to build the model, and a model card.

    --to hf         preprocessor_config.json (SiglipImageProcessor, Siglip2ImageProcessor, CLIPImageProcessor or
                    BitImageProcessor, as the family's released checkpoints) + README.md
    --to timm       config.json in timm's hub layout (architecture, num_classes, num_features, pretrained_cfg,
                    model_args) + README.md, beside model.safetensors
    --to open_clip  open_clip_config.json ({"model_cfg", "preprocess_cfg"}) + README.md, beside
                    open_clip_model.safetensors

Preprocessing is lalign's evaluation preprocessing (lalign/data/images.py): a centre square of `val_crop_fraction`
of the short side, resized to the model's size with `interpolation` (bicubic by default), scaled by 1/255 and
normalized with the statistics the run trained with (`load.checkpoint_normalization`: a workdir's record, a HF
preprocessor_config.json, a timm/open_clip config beside the file). Where the checkpoint states none (synthetic
scenes, a big_vision npz) it is the family's default (SigLIP [-1, 1], CLIP's, DINOv2's ImageNet statistics), and
the export says so in one line and in the card. SiglipImageProcessor resizes the whole image to a square (as the
released SigLIPs do), which equals lalign's centre crop for square images.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Callable, Optional

from lalign import log
from lalign.checkpoints import open_clip, timm
from lalign.checkpoints.normalization import family_normalization
from lalign.data.images import COMMON_OPTIONS, INTERPOLATIONS, NORMALIZATION
from lalign.files import write_text
from lalign.metric_writer import read_records

PAPER = ('Covert et al., "Locality Alignment Improves Vision-Language Models", ICLR 2025, '
         '[arXiv:2410.11087](https://arxiv.org/abs/2410.11087)')
BIBTEX = """@inproceedings{covert2025locality,
  title     = {Locality Alignment Improves Vision-Language Models},
  author    = {Covert, Ian and Sun, Tony and Zou, James and Hashimoto, Tatsunori},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  url       = {https://arxiv.org/abs/2410.11087}
}"""
# The license of well-known teachers' weights (by hub id prefix); any other teacher: "other" (its own governs).
TEACHER_LICENSES = (("google/siglip", "apache-2.0"), ("facebook/dinov2", "apache-2.0"), ("openai/clip", "mit"),
                    ("timm/vit_base_patch16_siglip", "apache-2.0"), ("timm/vit_so400m_patch14_siglip", "apache-2.0"))
_HUB_ID = re.compile(r"^(?:hf-hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@[\w./-]+)?$")
# HF image processor of each export kind (the class the family's released checkpoints name)
PROCESSORS = {"siglip": "SiglipImageProcessor", "siglip2": "Siglip2ImageProcessor", "clip": "CLIPImageProcessor",
              "dinov2": "BitImageProcessor"}


@dataclasses.dataclass
class Source:
    """What the hub files say about the exported checkpoint: its preprocessing and, for a training workdir's step,
    its run."""

    input: str
    normalization: str
    normalization_source: str
    stated: bool  # False: not known, the family's default
    interpolation: str = "bicubic"
    crop_fraction: float = 1.0
    workdir: Optional[str] = None
    step: Optional[int] = None
    config: dict = dataclasses.field(default_factory=dict)
    teacher: Optional[str] = None  # what the run initialized its teacher from (a hub id or a path)
    teacher_note: Optional[str] = None  # a teacher that is no checkpoint (pretrained by the run, random)
    output: str = "EXPORT_DIR"  # the folder the card's upload line names

    @property
    def mean(self):
        return list(NORMALIZATION[self.normalization][0])

    @property
    def std(self):
        return list(NORMALIZATION[self.normalization][1])


def describe_source(path: str, fmt, normalization: Callable[[], tuple[str, str]], model, *,
                    output: str = "EXPORT_DIR") -> Source:
    """The preprocessing and run of the checkpoint at `path` (read from its records, no weights). `fmt`: its input
    format's record (`formats.Format`), whose `workdir` finds the run that wrote it; `normalization()`: what the
    checkpoint states (`load.checkpoint_normalization`), `model`'s family's where that has no lalign name."""
    try:
        name, why = normalization()
    except ValueError as e:  # statistics with no lalign name
        name, why = family_normalization(model)
        why = f"{why}; {e}"
    stated = not (why.startswith("the ") or "model_type" in why or "default" in why)  # else a family's default
    if not stated:
        log.note(f"[export] {path} states no pixel normalization: the hub files use the family default "
                 f"{name!r} ({why})")
    src = Source(input=path, normalization=name, normalization_source=why, stated=stated, output=output)
    rec = fmt.workdir(path)
    if rec["kind"] in ("resolved", "config"):  # in a lalign run's workdir
        # a training checkpoint step (WORKDIR/checkpoints/KIND/STEP) is the run's aligned student; other params in
        # a workdir (its teacher/params) take the run's preprocessing but not its training record
        step_dir = os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(rec["source"])))
        if step_dir.split(os.sep)[0] == "checkpoints":
            src.workdir = os.path.dirname(rec["source"])
        src.config = rec["config"]
        data = src.config.get("data") or {}
        src.interpolation = data.get("interpolation") or COMMON_OPTIONS["interpolation"]
        src.crop_fraction = float(data.get("val_crop_fraction") or COMMON_OPTIONS["val_crop_fraction"])
        # the teacher as the run was given it (a hub id, not its local copy)
        init = ((rec.get("record") or {}).get("init_from") or {}).get("source") or src.config.get("init_from")
        if "pretrain" in (src.config.get("stages") or ()) or init in (None, "", "pretrain"):
            src.teacher_note = "pretrained from scratch by the same run (lalign's pretrain stage)"
        elif init == "random":
            src.teacher_note = "randomly initialized"
        else:
            src.teacher = init
        base = os.path.basename(os.path.normpath(path))
        src.step = int(base) if base.isdigit() and src.workdir else None
    return src


def _hub_id(spec: Optional[str]) -> Optional[str]:
    """The hub repo id of a teacher spec (None for a local path)."""
    if not spec or os.path.exists(spec):
        return None
    m = _HUB_ID.match(spec)
    return m.group(1) if m else None


def teacher_license(spec: Optional[str]) -> str:
    repo = _hub_id(spec) or ""
    return next((lic for prefix, lic in TEACHER_LICENSES if repo.startswith(prefix)), "other")


# ------------------------------------------------------------------------------------------------ HF
def hf_preprocessor(kind: str, size: int, src: Source, patch_size: int = 16,
                    num_patches: Optional[int] = None) -> dict:
    """preprocessor_config.json for a HF export of `kind` at `size` px."""
    if src.interpolation not in INTERPOLATIONS:
        raise ValueError(f"data.interpolation={src.interpolation!r} in {src.workdir}; expected one of "
                         f"{sorted(INTERPOLATIONS)}.")
    cfg = dict(image_processor_type=PROCESSORS[kind], do_convert_rgb=True, do_resize=True,
               resample=INTERPOLATIONS[src.interpolation], do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=src.mean, image_std=src.std)
    if kind == "siglip":
        cfg["size"] = {"height": size, "width": size}
    elif kind == "siglip2":  # NaFlex: as many patches as the exported table has, the aspect ratio kept
        cfg.update(patch_size=patch_size, max_num_patches=num_patches or (size // patch_size) ** 2)
    else:  # CLIP / DINOv2: the short side to size / crop_fraction, then the centre size x size
        cfg.update(size={"shortest_edge": int(round(size / src.crop_fraction))}, do_center_crop=True,
                   crop_size={"height": size, "width": size})
    return cfg


def write_hf_files(outdir: str, config: dict, src: Source) -> None:
    """preprocessor_config.json and README.md in a HF export directory (`config`: its config.json)."""
    kind = {"siglip_vision_model": "siglip", "siglip2_vision_model": "siglip2", "clip_vision_model": "clip"}.get(
        config["model_type"], "dinov2")
    size = int(config["lalign"]["image_size"])
    pre = hf_preprocessor(kind, size, src, int(config["patch_size"]), config.get("num_patches"))
    write_text(os.path.join(outdir, "preprocessor_config.json"), json.dumps(pre, indent=2) + "\n")
    arch = config["architectures"][0]
    load = (f"from transformers import AutoImageProcessor, AutoModel\n"
            f"model = AutoModel.from_pretrained(\"REPO_ID\")  # {arch}\n"
            f"processor = AutoImageProcessor.from_pretrained(\"REPO_ID\")  # {PROCESSORS[kind]}; "
            f"backend=\"pil\" (transformers 5) resizes with PIL as lalign\n"
            f"tokens = model(**processor(images=images, return_tensors=\"pt\")).last_hidden_state")
    if kind == "clip":
        load += "\ntokens = model.post_layernorm(tokens)  # CLIP: the aligned features are after the final norm"
    write_text(os.path.join(outdir, "README.md"),
               model_card(src, "transformers", arch, size, load, features=config["lalign"]["features"]))


# ---------------------------------------------------------------------------------------------- timm
# timm size name -> (width, depth, heads, mlp_ratio as timm spells it)
TIMM_SIZES = {"tiny": (192, 12, 3, 4.0), "small": (384, 12, 6, 4.0), "base": (768, 12, 12, 4.0),
              "large": (1024, 24, 16, 4.0), "so400m": (1152, 27, 16, 3.7362), "huge": (1280, 32, 16, 4.0)}
# named timm models, by family: {(size, patch): resolutions}
TIMM_NAMED = {
    "siglip": {("base", 16): (224, 256, 384, 512), ("large", 16): (256, 384, 512), ("so400m", 14): (224, 378, 384),
               ("so400m", 16): (256, 384, 512)},
    "clip": {("base", 16): (224,), ("base", 32): (224,), ("large", 14): (224,), ("huge", 14): (224,)},
    "clip_quickgelu": {("base", 16): (224,), ("base", 32): (224,), ("large", 14): (224, 336), ("huge", 14): (224, 378)},
    "dinov2": {("small", 14): (518,), ("base", 14): (518,), ("large", 14): (518,)},
    "plain": {("tiny", 16): (224,), ("small", 16): (224,), ("base", 16): (224,), ("large", 16): (224,)},
}
# each family's timm VisionTransformer arguments (beyond the size) and its LayerNorm eps
TIMM_FAMILY = {
    "siglip": (dict(class_token=False, global_pool="map", pre_norm=False, act_layer="gelu"), 1e-6),
    "clip": (dict(class_token=True, global_pool="token", pre_norm=True, act_layer="gelu"), 1e-5),
    "clip_quickgelu": (dict(class_token=True, global_pool="token", pre_norm=True, act_layer="quick_gelu"), 1e-5),
    "dinov2": (dict(class_token=True, global_pool="token", pre_norm=False, act_layer="gelu", init_values=1e-5), 1e-6),
    "plain": (dict(class_token=True, global_pool="token", pre_norm=False, act_layer="gelu"), 1e-6),
}
_TIMM_DEFAULTS = dict(no_embed_class=False, reg_tokens=0, init_values=None, pool_include_prefix=False)


def timm_family(model) -> str:
    if model.layerscale_init is not None or model.num_registers:
        return "dinov2"
    if model.has_class_token and model.pre_norm:
        return "clip_quickgelu" if model.act == "quick_gelu" else "clip"
    return "plain" if model.has_class_token else "siglip"


def _timm_name(family: str, size: str, patch: int, img: int, registers: bool) -> str:
    if family == "dinov2":
        return f"vit_{size}_patch{patch}_{'reg4_' if registers else ''}dinov2"
    if family == "plain":
        return f"vit_{size}_patch{patch}_{img}"
    return f"vit_{size}_patch{patch}_{family}_{img}"


def timm_architecture(model, kwargs: dict) -> tuple[str, dict]:
    """(timm's named model nearest to `model`, the model_args that make it `model`): the family's model of this
    width, patch and resolution where timm names one, else the family's base model with the sizes as model_args."""
    family = timm_family(model)
    patch, img = int(kwargs["patch_size"][0]), int(kwargs["img_size"][0])
    registers = bool(model.num_registers)
    size = next((n for n, s in TIMM_SIZES.items() if s[:3] == (model.width, model.depth, model.num_heads)), None)
    table = TIMM_NAMED[family]
    if size and (size, patch) in table:
        res = table[(size, patch)]
        named_img = img if img in res else min(res, key=lambda r: abs(r - img))
    else:  # no named model of this size: the family's base one, with every size as model_args
        (size, patch_named), res = next((k, v) for k, v in table.items() if k[0] == "base")
        named_img = res[0]
        patch = patch_named
    name = _timm_name(family, size, patch, named_img, registers)
    width, depth, heads, ratio = TIMM_SIZES[size]
    named = dict(_TIMM_DEFAULTS, **TIMM_FAMILY[family][0], img_size=named_img, patch_size=patch, embed_dim=width,
                 depth=depth, num_heads=heads, mlp_ratio=ratio)
    if family == "dinov2" and registers:
        named.update(reg_tokens=4, no_embed_class=True)
    args = {}
    for k, v in kwargs.items():
        if k in ("norm_eps", "fc_norm", "num_classes"):
            continue
        if k in ("img_size", "patch_size"):
            v = int(v[0]) if v[0] == v[1] else list(v)
        if k == "init_values":
            if (v is None) != (named["init_values"] is None):
                args[k] = v
            continue
        if k == "mlp_ratio" and int(kwargs["embed_dim"] * named["mlp_ratio"]) == round(kwargs["embed_dim"] * v) \
                and kwargs["embed_dim"] == named["embed_dim"]:
            continue
        if named.get(k) != v:
            args[k] = v
    if kwargs.get("global_pool") == "avg":
        args["fc_norm"] = kwargs["fc_norm"]
    args["num_classes"] = kwargs["num_classes"]
    eps = kwargs.get("norm_eps")
    if eps is not None and not math.isclose(eps, TIMM_FAMILY[family][1]):
        if math.isclose(eps, 1e-6):
            args["norm_layer"] = "layernorm"  # timm's LayerNorm: eps 1e-6
        else:
            log.note(f"[export] WARNING: timm's {name} uses LayerNorm eps {TIMM_FAMILY[family][1]}, this model "
                     f"{eps}, which timm's model_args cannot name; build it with "
                     f"lalign.checkpoints.timm.timm_model(path) for exact features")
    return name, args


def timm_hub_config(model, kwargs: dict, src: Source) -> dict:
    """timm's hub config.json (the layout of the timm/* repositories) for a `to_timm` export."""
    name, args = timm_architecture(model, kwargs)
    h, w = kwargs["img_size"]
    pretrained_cfg = dict(tag="lalign", custom_load=False, input_size=[3, int(h), int(w)], fixed_input_size=True,
                          interpolation=src.interpolation, crop_pct=src.crop_fraction, crop_mode="center",
                          mean=src.mean, std=src.std, num_classes=kwargs["num_classes"], pool_size=None,
                          first_conv="patch_embed.proj", classifier="head", license=teacher_license(src.teacher))
    return dict(architecture=name, num_classes=kwargs["num_classes"], num_features=kwargs["embed_dim"],
                global_pool=kwargs["global_pool"], pretrained_cfg=pretrained_cfg, model_args=args)


TIMM_WEIGHTS = "model.safetensors"


def is_folder_output(path: str) -> bool:
    """--to timm / open_clip: an OUTPUT ending in .safetensors is that one file, any other a hub folder."""
    return not path.endswith(".safetensors")


def export_timm(params, model, path: str, src: Source, **kw) -> dict:
    """`timm.to_timm` to a .safetensors file, or a hub folder (model.safetensors, config.json, README.md) at
    `path`; returns the timm kwargs."""
    if not is_folder_output(path):
        return timm.to_timm(params, model, path, **kw)
    os.makedirs(path, exist_ok=True)
    kwargs = timm.to_timm(params, model, os.path.join(path, TIMM_WEIGHTS), **kw)
    write_timm_files(path, model, kwargs, src)
    return kwargs


def write_timm_files(outdir: str, model, kwargs: dict, src: Source) -> dict:
    """config.json and README.md in a timm hub folder (weights: model.safetensors); returns the config."""
    cfg = timm_hub_config(model, kwargs, src)
    write_text(os.path.join(outdir, "config.json"), json.dumps(cfg, indent=2) + "\n")
    margs = "".join(f", {k}={v!r}" for k, v in cfg["model_args"].items())
    load = (f"import timm\n"
            f"model = timm.create_model(\"hf-hub:REPO_ID\", pretrained=True)  # {cfg['architecture']}; "
            f"a local copy: \"local-dir:PATH\"\n"
            f"# or from the folder: timm.create_model(\"{cfg['architecture']}\", pretrained=True, "
            f"pretrained_cfg_overlay=dict(file=\"{TIMM_WEIGHTS}\"){margs})\n"
            f"transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))\n"
            f"tokens = model.forward_features(transform(image)[None])")
    write_text(os.path.join(outdir, "README.md"), model_card(src, "timm", cfg["architecture"],
                                                             int(kwargs["img_size"][0]), load,
                                                             features="forward_features(x)"))
    return cfg


# ----------------------------------------------------------------------------------------- open_clip
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def open_clip_preprocess_cfg(size: int, src: Source) -> dict:
    """open_clip's preprocess_cfg (open_clip.transform.PreprocessCfg fields) of lalign's evaluation preprocessing:
    the short side resized, the centre cropped."""
    return dict(size=size, mode="RGB", mean=src.mean, std=src.std, interpolation=src.interpolation,
                resize_mode="shortest", fill_color=0)


def export_open_clip(params, model, path: str, src: Source, **kw) -> dict:
    """`open_clip.to_open_clip` to a .safetensors file, or a hub folder (open_clip_model.safetensors,
    open_clip_config.json, README.md) at `path`; returns open_clip's model_cfg."""
    if not is_folder_output(path):
        return open_clip.to_open_clip(params, model, path, **kw)
    os.makedirs(path, exist_ok=True)
    cfg = open_clip.to_open_clip(params, model, os.path.join(path, OPEN_CLIP_WEIGHTS), **kw)
    write_open_clip_files(path, cfg, src)
    return cfg


def write_open_clip_files(outdir: str, model_cfg: dict, src: Source) -> dict:
    """open_clip_config.json and README.md in an open_clip hub folder (weights: open_clip_model.safetensors)."""
    size = model_cfg["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": open_clip_preprocess_cfg(int(size), src)}
    write_text(os.path.join(outdir, "open_clip_config.json"), json.dumps(cfg, indent=2) + "\n")
    load = ("import json\n"
            "from safetensors.torch import load_file\n"
            "from open_clip.transform import PreprocessCfg, image_transform_v2\n"
            "from lalign.checkpoints.open_clip import open_clip_visual  # builds the tower from model_cfg\n"
            f"visual = open_clip_visual(\"{OPEN_CLIP_WEIGHTS}\")  # open_clip VisionTransformer (image tower)\n"
            "visual.load_state_dict({k[len('visual.'):]: v for k, v in "
            f"load_file(\"{OPEN_CLIP_WEIGHTS}\").items()}})\n"
            "visual.output_tokens = True\n"
            "cfg = json.load(open(\"open_clip_config.json\"))\n"
            "transform = image_transform_v2(PreprocessCfg(**cfg[\"preprocess_cfg\"]), is_train=False)\n"
            "pooled, tokens = visual(transform(image)[None])")
    write_text(os.path.join(outdir, "README.md"), model_card(src, "open_clip", "VisionTransformer", int(size), load,
                                                             features="tokens (output_tokens=True)"))
    return cfg


# --------------------------------------------------------------------------------------------- card
def _training(src: Source) -> list[str]:
    """The card's training section of a workdir's step."""
    cfg, me, opt, data = src.config, src.config.get("maskembed") or {}, src.config.get("optimizer") or {}, \
        src.config.get("data") or {}
    rows = [("data", f"{data.get('name', '?')}" + (f" ({data['root']})" if data.get("root") else "")),
            ("steps", f"{src.step} of {cfg.get('total_steps')}" if src.step is not None else cfg.get("total_steps")),
            ("batch size", cfg.get("batch_size")), ("learning rate", f"{opt.get('lr')} (base batch "
                                                                     f"{opt.get('lr_base_batch')}, "
                                                                     f"{opt.get('lr_scale_rule')} scaling)"),
            ("weight decay", opt.get("wd")), ("loss", me.get("loss")),
            ("mask sampler", f"{me.get('sampler')} (keep_prob {me.get('keep_prob')})"),
            ("decoder depth", me.get("decoder_depth")), ("resolution", data.get("image_size")),
            ("normalization", src.normalization), ("seed", cfg.get("seed"))]
    out = ["## Training", "", f"Trained with lalign's MaskEmbed (`{src.workdir}`, `config.json`):", "",
           "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    vals = [r for r in read_records(src.workdir)
            if r.get("stage", "maskembed") == "maskembed" and "val_loss" in r]
    if vals:
        best = min(vals, key=lambda r: r["val_loss"])
        at = next((r for r in reversed(vals) if r.get("step") == src.step), None)
        line = f"Validation loss (MaskEmbed): best {best['val_loss']:.4f} at step {best.get('step')}"
        if at is not None:
            line += f"; {at['val_loss']:.4f} at the exported step {src.step}"
        out += [line + ".", ""]
    summary = os.path.join(src.workdir, "summary.json")
    probe = {}
    if os.path.isfile(summary):
        with open(summary) as f:
            probe = json.load(f).get("probe") or {}
    if probe:
        out += ["Patch-level probe (the paper's: 2 transformer blocks on frozen patch features, macro recall):", "",
                "| backbone | macro recall | mIoU |", "|---|---|---|"]
        for who, r in probe.items():
            if isinstance(r, dict) and "macro_recall" in r:
                miou = r.get("miou")
                out.append(f"| {who} | {r['macro_recall']:.4f} | {'' if miou is None else f'{miou:.4f}'} |")
        out.append("")
    return out


def model_card(src: Source, library: str, arch: str, size: int, load: str, features: str) -> str:
    """README.md: HF front matter, what the model is, its teacher, the method, the run, intended use, license,
    loading and uploading."""
    base = _hub_id(src.teacher)
    lic = teacher_license(src.teacher)
    front = ["---", f"license: {lic}"]
    if lic == "other":
        front.append("license_name: teacher-license")
    if base:
        front.append(f"base_model: {base}")
    front += [f"library_name: {library}", "pipeline_tag: image-feature-extraction", "tags:", "- locality-alignment",
              "- maskembed", "- vision", "- image-feature-extraction", "---", ""]
    teacher = (f"[{base}](https://huggingface.co/{base})" if base else f"`{src.teacher}`" if src.teacher else
               src.teacher_note or "not recorded by the exported checkpoint")
    if src.workdir:  # a MaskEmbed run's step: the aligned student
        what = (f"# Locality-aligned ViT ({arch}, {size}px)", "",
                f"A vision transformer after locality alignment with MaskEmbed ({PAPER}): the teacher's weights, "
                f"further trained so that each patch token encodes what is at that patch. "
                f"Base model (teacher): {teacher}. Exported by lalign from `{src.input}`.", "")
    else:  # a checkpoint lalign converted (it records no run)
        what = (f"# ViT ({arch}, {size}px)", "",
                f"A vision transformer converted by lalign from `{src.input}`"
                + (f" (base model: {teacher})" if src.teacher else "") + ". lalign trains locality-aligned ViTs "
                f"with MaskEmbed ({PAPER}); the export records no run.", "")
    stated = (f"from {src.normalization_source}" if src.stated else
              f"not stated by the checkpoint: the family default, {src.normalization_source}")
    crop = ("the centre square" if src.crop_fraction == 1 else
            f"a centre square of {src.crop_fraction:g} of the short side")
    pre = (f"Preprocessing: {crop}, resized to {size}px "
           f"({src.interpolation}), scaled by 1/255, normalized with mean {src.mean} and std {src.std} "
           f"({src.normalization}; {stated}).")
    out = [*front, *what]
    if src.workdir:
        out += _training(src)
    out += ["## Intended use", "",
            "A drop-in vision tower for vision-language models (its patch tokens feed the language model's adapter) "
            "and for dense tasks (segmentation, detection, patch-level probing); the "
            f"{'aligned ' if src.workdir else ''}per-token features are {features}.", "", pre, "",
            "## License", "",
            f"The teacher's own license governs these weights{f' ({lic})' if lic != 'other' else ''}; check it "
            f"before use.", "",
            "## Use", "", "```python", load, "```", "",
            "Upload this folder:", "", "```python",
            f"huggingface_hub.upload_folder(repo_id=\"REPO_ID\", folder_path=\"{src.output}\")", "```", "",
            "## Citation", "", "```bibtex", BIBTEX, "```", ""]
    return "\n".join(out)
