"""Convert ViT checkpoints between orbax (lalign), big_vision npz, Hugging Face, timm and open_clip.

    python -m lalign.export --input WORKDIR/checkpoints/best/2000 --output aligned_hf --to hf --kind siglip \\
        --head-from WORKDIR/teacher/params
    python -m lalign.export --input siglip_b16_224.npz --output teacher_params --to orbax --variant B/16
    python -m lalign.export --input hf_dir --output model.npz --to bigvision --scan
    python -m lalign.export --input model.safetensors --from timm --output hf_dir --to hf
    python -m lalign.export --input WORKDIR/checkpoints/best/2000 --vlm google/paligemma-3b-pt-224 \\
        --output paligemma_aligned --to paligemma

Input formats (--from; guessed from the path when omitted):
  orbax      a params dir written by lalign.checkpoints.manager.save_params (e.g. WORKDIR/teacher/params), or a
             training checkpoint step dir (WORKDIR/checkpoints/best/STEP): its aligned student is exported.
  bigvision  a big_vision .npz (per-block or scanned layout; two-tower SigLIP files: the image tower).
  hf         a Hugging Face SigLIP / CLIP / DINOv2 directory (config.json + model.safetensors; the vision tower
             of a two-tower model).
  timm       a timm VisionTransformer state dict (.safetensors), or a timm hub folder (config.json with its
             "architecture" + model.safetensors).
  open_clip  an open_clip CLIP model's or image tower's state dict (.safetensors; open_clip_config.json beside it
             is read when present), or a folder of open_clip_config.json + open_clip_model.safetensors.
Output formats (--to): hf, timm, open_clip (.safetensors), bigvision (.npz), orbax (params dir, plus
OUTPUT.model.json).
Hub-ready outputs (lalign/checkpoints/hub_files.py): --to hf writes config.json, model.safetensors, the family's
preprocessor_config.json (SigLIP / SigLIP 2 / CLIP / Bit image processor with the run's size, interpolation and
normalization) and a README.md model card (teacher, method, the run's config, validation loss and probe results
for a workdir's step). --to timm and --to open_clip: an OUTPUT ending in .safetensors is that one file (lalign
metadata inside, nothing beside it); any other OUTPUT is a hub folder: timm's model.safetensors + config.json
(architecture: timm's named model of that family, model_args: what differs; pretrained_cfg: the preprocessing) +
README.md, or open_clip's open_clip_model.safetensors + open_clip_config.json (model_cfg, preprocess_cfg) +
README.md. Where the checkpoint states no normalization the family's is used, and the export says so.
VLM outputs (--to paligemma, --to llava): the ViT as the vision tower of the VLM checkpoint --vlm (a folder or a hub
id), every other tensor and file copied as it is (lalign/checkpoints/vlm.py). --to paligemma: a HF
PaliGemmaForConditionalGeneration folder, or big_vision's PaliGemma .npz (its img/ tower replaced, img/head, the
projection, kept); --to llava: a HF LlavaForConditionalGeneration or LlavaOnevisionForConditionalGeneration folder
(SigLIP or CLIP tower). The ViT must fit the tower exactly (width, depth, heads, patch, image size, MLP dim,
activation, LayerNorm eps, pooling head), else the field is named; a tower with a MAP head needs --head-from.
The VLM keeps its dtypes (no --dtype) and its configs: Llava reads the tower's hidden_states[vision_feature_layer],
before the final LayerNorm the aligned features include.
An output that exists is refused unless --overwrite, and one that would replace the input is always refused. Every
output is written at a staging path beside OUTPUT and renamed into place once complete, so an error or a kill
never leaves half of one (or has already removed the old one).

Model fields. HF inputs, files written by this tool and lalign workdirs record the architecture: a workdir's
`resolved.json` (every field of the teacher and the student its run built), or `INPUT.model.json` (written by
--to orbax); no flag is needed, and a --model/--variant/--num-heads value that contradicts a recorded field is
refused, naming both. For the other inputs the parameter shapes give width, depth, mlp_dim, heads (not timm),
patch size, class token, pre-norm, MAP head, classifier; what they cannot give (activation, LayerNorm eps, heads
of a timm file, pooling without a head) comes from the flags, then for an orbax input in a workdir from before
resolved.json its `config.json` (its "model" section, or the teacher it names where that teacher records its
model, and for a student the MaskEmbed attn_softcap), else big_vision defaults (gelu tanh, eps 1e-6). CLIP-style
models need --model '{"act": "quick_gelu", "ln_eps": 1e-5}' unless recorded.

Aligned students (no pooling head): --to hf --kind siglip needs a head for SiglipVisionModel to load strictly:
--head-from TEACHER copies the teacher's MAP head, --no-head writes vision_use_head=false; otherwise a random head
is written with a warning (pooler_output meaningless, token features unaffected). The aligned per-token features
are HF SigLIP / DINOv2 `last_hidden_state`, HF CLIP `post_layernorm(last_hidden_state)`, timm
`forward_features(x)` and open_clip's tokens (`output_tokens=True`, class token excluded). --to open_clip needs the
projection `proj`: --head-from TEACHER copies the teacher's.

A student trained with the reference's attention soft-cap (maskembed.attn_softcap) cannot be written as hf, timm
or open_clip, whose attention has none: the effect of dropping it is measured first (lalign/softcap.py; on
--softcap-images DIR, else on the embedded scenes) and printed; --allow-softcap-drop exports it without the cap.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import ml_dtypes
import numpy as np

from lalign import cli as cli_lib
from lalign import log
from lalign import softcap
from lalign.checkpoints import formats, hf, hub, hub_files, vlm
from lalign.checkpoints.common import grid_of, model_fields, to_layout
from lalign.checkpoints.formats import decoder_path, save_decoder
from lalign.checkpoints.load import checkpoint_normalization, guess_format, load_any, load_with_decoder

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": ml_dtypes.bfloat16, "float16": np.dtype(np.float16)}


def _fields_from_args(args) -> dict:
    fields = {}
    if args.model:
        try:
            fields = json.loads(args.model)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model is not valid JSON: {e}") from None
        if not isinstance(fields, dict):
            raise ValueError("--model must be a JSON object of ViT fields, e.g. '{\"act\": \"quick_gelu\"}'.")
    if args.variant:
        fields["variant"] = args.variant
    if args.num_heads:
        fields["num_heads"] = args.num_heads
    return fields


# ------------------------------------------------------------------------------------------ safe outputs
def _occupied(path: str) -> Optional[str]:
    """What is at `path` that writing there would destroy (None: nothing, or an empty directory)."""
    if os.path.isdir(path):
        n = len(os.listdir(path))
        return f"a directory with {n} entr{'y' if n == 1 else 'ies'}" if n else None
    return "a file" if os.path.lexists(path) else None


def _checkpoints_folder(path: str) -> Optional[str]:
    """The `checkpoints` folder of a workdir (one holding orbax's `latest`/`best` or `checksums`) that `path` is in,
    or None. Its steps are removed as a run goes on (latest keeps two), and with them anything written inside."""
    d = path
    while True:
        if os.path.basename(d) == "checkpoints" and any(os.path.isdir(os.path.join(d, s))
                                                        for s in ("latest", "best", "checksums")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def inputs(args) -> dict:
    """What the export reads, by flag: no output may go where it would replace them or sit inside them."""
    return {flag: path for flag, path in (("--input", args.input), ("--head-from", args.head_from),
                                          ("--vlm", getattr(args, "vlm", None))) if path}


def check_outputs(paths, sources, overwrite: bool) -> None:
    """Outputs never destroy inputs: an output that would replace a checkpoint being read (or a folder holding
    it), that lies inside one, or inside a workdir's checkpoints folder (whose steps rotate out) is refused even
    with --overwrite; anything else already there is refused unless --overwrite. `sources`: {flag: path} (a
    path alone: --input)."""
    sources = {"--input": sources} if isinstance(sources, str) else sources
    for path in paths:
        dst = os.path.realpath(path)
        for flag, source in sources.items():
            src = os.path.realpath(source)
            if src == dst or src.startswith(dst.rstrip(os.sep) + os.sep):
                raise ValueError(f"--output {path} would replace the input {source} it is read from; choose another "
                                 f"--output.")
            if dst.startswith(src.rstrip(os.sep) + os.sep):
                raise ValueError(f"--output {path} is inside the input {source} ({flag}), which it would change; "
                                 f"choose an --output outside it.")
        folder = _checkpoints_folder(dst)
        if folder:
            raise ValueError(f"--output {path} is inside the checkpoints folder of the workdir "
                             f"{os.path.dirname(folder)}, whose steps are deleted as the run goes on (and the "
                             f"export with them); choose an --output outside {folder}.")
        what = _occupied(path)
        if what and not overwrite:
            raise FileExistsError(f"--output: {path} already exists ({what}); choose a new path, or pass "
                                  f"--overwrite to replace it.")


def drop_softcap(model, params, args):
    """(the model without its attention soft-cap, the measurement) for a format that cannot hold the cap: measured
    first (lalign.softcap); refused unless --allow-softcap-drop, with the numbers either way."""
    size = grid_of(to_layout(params, False), model, args.image_size)[0] * int(model.patch_size[0])
    images, source = softcap.sample_images(model, size, args.softcap_images, _normalization(args) or "siglip")
    stats = softcap.measure(model, params, images)
    what = f"{args.input} was trained with the attention soft-cap, which {args.to} attention cannot hold: " \
           f"{softcap.describe(stats)} ({source})"
    if not args.allow_softcap_drop:
        raise ValueError(f"{what}. Pass --allow-softcap-drop to export it without the cap.")
    log.note(f"[export] WARNING: {what}; exported without the cap.")
    return model.clone(attn_softcap=None), dict(stats, images=source)


def _normalization(args) -> Optional[str]:
    """The input's normalization (`checkpoint_normalization`), or None where its statistics have no lalign name."""
    try:
        return checkpoint_normalization(args.input, args.src, tower=args.tower)[0]
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------ the command
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lalign.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint to read (file or directory)")
    p.add_argument("--output", required=True, help="where to write (HF: a directory; timm: .safetensors; "
                                                   "bigvision: .npz; orbax: a directory)")
    p.add_argument("--to", required=True, choices=formats.outputs(), help="output format")
    p.add_argument("--from", dest="src", choices=formats.inputs(),
                   help="input format (default: guessed from --input)")
    p.add_argument("--kind", choices=hf.KINDS,
                   help="HF output: SiglipVisionModel, CLIPVisionModel or Dinov2(WithRegisters)Model (default: "
                        "dinov2 for a ViT with LayerScale or registers, clip for one with class token and pre-norm, "
                        "else siglip)")
    p.add_argument("--variant", help="big_vision variant, e.g. B/16 or So400m/14 (fills width/depth/heads/...)")
    p.add_argument("--model", help="JSON object of ViT fields, e.g. '{\"act\": \"quick_gelu\", \"ln_eps\": 1e-5}'")
    p.add_argument("--num-heads", type=int, help="attention heads (needed for timm files without lalign metadata)")
    p.add_argument("--head-from", help="teacher checkpoint (any input format) whose MAP head a head-less aligned "
                                       "student gets in the hf/timm output")
    p.add_argument("--no-head", action="store_true",
                   help="hf siglip output of a head-less student: write vision_use_head=false instead of a head")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                   help="bigvision/orbax output layout: scanned (--scan) or per-block (--no-scan); default: as read")
    p.add_argument("--image-size", type=int, help="image size (only for sincos2d position embeddings)")
    p.add_argument("--tower", default="img", help="two-tower big_vision npz: which tower (default img)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="cast the written weights")
    p.add_argument("--allow-softcap-drop", action="store_true",
                   help="export a student trained with the attention soft-cap to hf/timm/open_clip, whose attention "
                        "has none (its effect is measured and printed first)")
    p.add_argument("--softcap-images", help="image folder on which the soft-cap's effect is measured (default: the "
                                            "embedded scenes)")
    p.add_argument("--params-only", action="store_true",
                   help="a training checkpoint step (e.g. checkpoints/quarantine/STEP): read and verify its params "
                        "alone, whatever the rest of the step holds")
    p.add_argument("--vlm", help="--to paligemma/llava: the VLM checkpoint (HF folder, hub id, or big_vision "
                                 "PaliGemma .npz) whose vision tower the ViT replaces")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (it is removed only once the new one is complete)")
    return p


def resolve_inputs(args, fmt: formats.Format) -> None:
    """Hub ids and bucket URLs among the inputs fetched once into a local cache; --vlm given exactly for a format
    that writes into a VLM checkpoint (whose dtypes it keeps: no --dtype)."""
    args.input = hub.resolve(args.input).path
    if args.head_from:
        args.head_from = hub.resolve(args.head_from).path
    if fmt.takes_vlm != bool(args.vlm):
        takes_vlm = [name for name in formats.outputs() if formats.FORMATS[name].takes_vlm]
        raise ValueError(f"--to {args.to} needs --vlm (the VLM checkpoint to start from)" if args.vlm is None else
                         f"--vlm is for --to {' or '.join(takes_vlm)}, not --to {args.to}.")
    if args.vlm:
        if args.dtype:
            raise ValueError(f"--dtype: --to {args.to} keeps the dtypes the VLM checkpoint --vlm stores.")
        args.vlm = hub.resolve(args.vlm, files=vlm.HUB_FILES).path


def teacher_head(args, fmt: formats.Format):
    """The pooling head a head-less student takes from --head-from (`fmt.head`: a MAP head, or open_clip's
    projection), or None without --head-from."""
    if not args.head_from:
        return None
    _, teacher = load_any(args.head_from, None, {}, tower=args.tower, quiet=True)
    key, what = fmt.head
    if key not in teacher:
        raise ValueError(f"--head-from {args.head_from}: that checkpoint has no {what}.")
    return teacher[key]


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    fmt = formats.writer(args.to)
    resolve_inputs(args, fmt)

    # ---- read, with every output checked before anything is written
    check_outputs([args.output, *fmt.sidecars(args.output)], inputs(args), args.overwrite)
    model, params, decoder = load_with_decoder(args.input, args.src, _fields_from_args(args), tower=args.tower,
                                               params_only=args.params_only)
    if decoder is not None and not fmt.writes_decoder:  # a file beside the output
        check_outputs([decoder_path(args.output, args.to)], inputs(args), args.overwrite)
    softcap_stats = None
    if model.attn_softcap is not None and not fmt.holds_softcap:
        model, softcap_stats = drop_softcap(model, params, args)

    # ---- write
    job = formats.Export(
        params, model, args.output, args.to, input=args.input, head=teacher_head(args, fmt),
        dtype=DTYPES[args.dtype] if args.dtype else None, image_size=args.image_size, kind=args.kind,
        drop_head=args.no_head, scan=args.scan, vlm=args.vlm, normalization=lambda: _normalization(args),
        written={"output": args.output, "to": args.to, "model": model_fields(model)},
        decoder=decoder if fmt.writes_decoder else None)
    if fmt.hub_folder(args.output):  # what the hub files state: preprocessing, the run
        job.source = hub_files.describe_source(
            args.input, formats.reader(args.src or guess_format(args.input)),
            lambda: checkpoint_normalization(args.input, args.src, tower=args.tower), model, output=args.output)
    if softcap_stats:
        job.written["softcap_dropped"] = softcap_stats
    fmt.write(job)
    if decoder is not None:
        job.written["decoder"] = decoder_path(args.output, args.to)
        if not fmt.writes_decoder:
            save_decoder(decoder, args.output, args.to)
        log.note(f"[export] wrote the MaskEmbed decoder to {job.written['decoder']}")
    print(json.dumps(job.written))
    return 0


def cli(argv=None) -> int:
    """`main` with user errors (a wrong path, an output in the way, a checkpoint that does not fit) as one line."""
    return cli_lib.returning("export", main, argv)


def console() -> None:
    """`lalign-export` / `python -m lalign.export`."""
    sys.exit(cli())


if __name__ == "__main__":
    console()
