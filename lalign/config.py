"""The run config's schema: every field of `lalign.main`'s config, its default, the values it allows and what it
means, written once, here.

Experiment configs (`configs/<name>.py[:arg]`, big_vision style: `get_config(arg)` builds an ml_collections
ConfigDict) start from `defaults()` and set what their experiment changes; `complete(config)` fills in what an
older or hand-written config leaves out, and `errors(config)` checks every field against its rule, naming each bad
one. The training loop reads fields without defaults of its own. The defaults are the reference's recipe
(iancovert/locality-alignment, as its scripts run it); where lalign deviates the field's text says why.

    python -m lalign.config                                     # every field, its default and meaning
    python -m lalign.config configs/siglip_so400m.py:smoke      # the same, with that config's values

Two sections are open: `model` holds `lalign.models.vit.ViT` fields (what a checkpoint cannot tell; the rest is
read from it), and `data` the options of its source (`data.name`), each source's table beside its reader:
lalign/data/images.py COMMON_OPTIONS, image_folder.py OPTIONS, tfds.py OPTIONS and scenes.py SceneSpec.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Optional

import ml_collections
from ml_collections import config_dict

# Only modules that never import this one (see keys_of for those that do).
from lalign import data, maskembed, optim
from lalign.checkpoints.load import POSEMB_RESIZE
from lalign.data import probe_splits
from lalign.data.segmentation import LABEL_RULES

# The checkout (or installed package) lalign runs from: a relative config path that is not found from the current
# directory is read from here, so `load("configs/demo.py")` works from any directory.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(spec: str):
    """`configs/x.py[:arg]` -> its ConfigDict (`get_config(arg)`, or `get_config()` without an arg), as
    `lalign.main --config=` reads it."""
    path, _, arg = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(ROOT, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {spec.partition(':')[0]!r} not found (from {os.getcwd()} or {ROOT}).")
    module_spec = importlib.util.spec_from_file_location("lalign_experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


# ------------------------------------------------------------------------------------------------------ rules
class Rule:
    """What a field's value must be: `ok(value)`, and `says`, which completes "config.<field> ...": "must be a
    positive integer". `says` may be a function, for choices read when first needed (`keys_of`)."""

    def __init__(self, ok: Callable[[Any], bool], says):
        self.ok, self._says = ok, says

    @property
    def says(self) -> str:
        return self._says() if callable(self._says) else self._says


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE_INT = Rule(lambda v: _is_int(v) and v > 0, "must be a positive integer")
OFF_OR_POSITIVE_INT = Rule(lambda v: _is_int(v) and v >= 0, "must be 0 (off) or a positive integer")
INT = Rule(_is_int, "must be an integer")
BOOL = Rule(lambda v: isinstance(v, bool), "must be True or False")
TEXT = Rule(lambda v: isinstance(v, str), "must be a string")
POSITIVE = Rule(lambda v: _is_number(v) and v > 0, "must be a positive number")
NON_NEGATIVE = Rule(lambda v: _is_number(v) and v >= 0, "must be >= 0")


def one_of(*choices) -> Rule:
    return Rule(lambda v: isinstance(v, str) and v in choices, f"must be one of {choices}")


def keys_of(module: str, table: str) -> Rule:
    """One of the keys of a dispatch table, read when a value is first checked: the table's module (lalign.watch,
    lalign.probe) imports this one, so it cannot be imported while this one is."""
    def keys() -> tuple:
        return tuple(getattr(importlib.import_module(module), table))

    return Rule(lambda v: isinstance(v, str) and v in keys(), lambda: f"must be one of {keys()}")


def within(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Rule:
    text = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
    return Rule(lambda v: _is_number(v) and (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi),
                f"must be in {text}")


def or_none(rule: Rule, what: str) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"{rule.says} or None ({what})")


INT_TUPLE = Rule(lambda v: isinstance(v, (tuple, list)) and all(_is_int(x) for x in v), "must be a tuple of integers")


def pair(lo: float, hi: float) -> Rule:
    """(min, max) with lo < min <= max <= hi, or () for off."""
    return Rule(lambda v: isinstance(v, (tuple, list)) and (not v or (len(v) == 2 and all(_is_number(x) for x in v)
                                                                      and lo < v[0] <= v[1] <= hi)),
                f"must be () or (min, max) with {lo:g} < min <= max <= {hi:g}")


@dataclasses.dataclass(frozen=True)
class Field:
    default: Any
    rule: Rule
    doc: str


@dataclasses.dataclass(frozen=True)
class Open:
    """A section whose keys belong to someone else (the ViT's fields, a data source's options). `choices`, if
    given, returns {kind: its fields at their defaults}, keyed by the section's `name` (the data sources)."""
    doc: str
    default: dict = dataclasses.field(default_factory=dict)
    choices: Optional[Callable[[], dict]] = None


# ------------------------------------------------------------------------------------------------------ schema
# The choices are the keys of the tables that act on them, imported from there (or read by keys_of): one list
# of each.
LR_SCALE_RULES = tuple(optim.LR_SCALE_RULES)
WEIGHT_DECAY_ON = tuple(optim.DECAYED)
DTYPES = ("", "float32", "bfloat16", "float16")  # "" = float32
STAGES = ("pretrain", "maskembed", "probe")

IMAGENET21K_IMAGES = 13_153_500  # winter 2021 release
RECIPE_BATCH = 1024
RECIPE_EPOCHS = 5

TARGET_LAYER = Rule(lambda v: v in ("penultimate", "last") or POSITIVE_INT.ok(v),
                    "must be 'penultimate', 'last' or a block number >= 1")
STAGE_LIST = Rule(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(s in STAGES for s in v),
                  f"must be a non-empty tuple of {STAGES}")


def _optimizer(*, lr, scaled: bool, wd: float, b2: float, warmup_steps: int, lr_min_ratio: float) -> dict:
    fields = dict(
        lr=Field(lr, POSITIVE, "peak learning rate (AdamW)" + (" at global batch lr_base_batch" if scaled else "")),
        wd=Field(wd, NON_NEGATIVE, "AdamW weight decay (decoupled, multiplied by the lr schedule)"),
        b1=Field(0.9, within(0, 1, open_hi=True), "AdamW beta1"),
        b2=Field(b2, within(0, 1, open_hi=True), "AdamW beta2"),
        grad_clip=Field(1.0, NON_NEGATIVE, "global-norm gradient clip; 0: off"),
        warmup_steps=Field(warmup_steps, OFF_OR_POSITIVE_INT, "linear warm-up steps before the cosine decay"),
        lr_min_ratio=Field(lr_min_ratio, within(0, 1), "the cosine decay ends at lr x lr_min_ratio"),
        weight_decay_on=Field("all", one_of(*WEIGHT_DECAY_ON),
                              "which parameters decay: 'all' is the reference's (its train.py gives timm's "
                              "optimizer factory no module, so no groups); 'timm_groups' (no decay on biases, "
                              "norms, position and class tokens), 'kernels' (lalign/optim.py, DECAYED)"),
    )
    if scaled:
        fields.update(
            lr_base_batch=Field(RECIPE_BATCH, OFF_OR_POSITIVE_INT,
                                "the global batch `lr` belongs to; 0: lr used as given at any batch (the "
                                "reference's way)"),
            lr_scale_rule=Field("sqrt", one_of(*LR_SCALE_RULES),
                                "at another batch, lr x rule(batch / lr_base_batch): sqrt (timm's rule for Adam) | "
                                "linear | none. Deviation: the reference takes its lr as given at any batch; the "
                                "recipe's lr at batch 4 moved a DINOv2-S away from its teacher's locality "
                                "(docs/design.md, 'Deviations'). At batch 1024 nothing changes"))
    return fields


# The patch probe (lalign/probe/heads.py): the paper's settings. The pipeline's probe stage and `lalign.probe` share
# it.
PROBE_HEAD = dict(
    depth=Field(2, POSITIVE_INT, "the patch probe's transformer blocks (the paper's)"),
    epochs=Field(5, POSITIVE_INT, "probe training epochs"),
    batch_size=Field(32, POSITIVE_INT, "probe batch size"),
    lr=Field(1e-3, POSITIVE, "probe peak learning rate (AdamW)"),
    lr_min_ratio=Field(0.1, within(0, 1), "cosine decay to lr x lr_min_ratio"),
    warmup_steps=Field(500, OFF_OR_POSITIVE_INT, "linear warm-up steps"),
    warmup_fraction=Field(None, or_none(within(0, 1, open_lo=True), "warmup_steps alone"),
                          "warm-up = min(warmup_steps, warmup_fraction x all steps), for small data sets whose "
                          "schedule the paper's 500 steps would fill (lalign/probe/heads.py, probe_schedule)"),
    wd=Field(0.01, NON_NEGATIVE, "probe weight decay"),
    seeds=Field((0,), INT_TUPLE, "one probe per seed, trained side by side in one program"),
    select_by=Field("miou", keys_of("lalign.probe.metrics", "SELECT_BY"),
                    "Deviation: the epoch is chosen by validation mIoU, not by the paper's validation macro recall "
                    "(still the reported metric): recall is won by a probe that predicts every class everywhere "
                    "(lalign/probe/metrics.py, SELECT_BY). 'recall' selects as the paper does"),
    eval_batch_size=Field(512, POSITIVE_INT,
                          "largest evaluation chunk; the chunk is the smallest split rounded up to a power of two, "
                          "within what a training step's activations allow (lalign/probe/heads.py, eval_chunk)"),
)


# The probe section of a run (its probe stage) and of a `lalign.probe` config: the head, and the split sizes of
# the embedded scenes (other data sets size their splits in config.data).
PROBE = dict(
    num_train=Field(4000, POSITIVE_INT, "scenes: training scenes"),
    num_val=Field(500, POSITIVE_INT, "scenes: validation scenes (epoch selection)"),
    num_test=Field(1000, POSITIVE_INT, "scenes: test scenes"),
    **PROBE_HEAD,
)


SCHEMA: dict = dict(
    seed=Field(0, INT, "the run's seed: data order, masks, initialization"),
    stages=Field(("maskembed",), STAGE_LIST,
                 "what the run does, in order: pretrain (the demo's teacher on scenes) | maskembed | probe (the "
                 "demo's patch and image probes; other data sets: python -m lalign.probe)"),
    init_from=Field("", TEXT, "the teacher checkpoint: a path (orbax, big_vision .npz, HF folder, timm, open_clip), "
                              "hf://ORG/NAME[@REV], or 'random'; required unless 'pretrain' is a stage"),
    init_format=Field("", TEXT, "the checkpoint's format; '' guesses it from the path"),
    init_posemb_resize=Field("bicubic_antialias", one_of(*POSEMB_RESIZE),
                             "a checkpoint trained at another grid: its position table resized as timm does; "
                             "'none' refuses"),
    data=Open("the data source: `name` and that source's options, their defaults in the table beside its reader "
              "(lalign/data/__init__.py, SOURCES)", choices=lambda: {n: s.options for n, s in data.SOURCES.items()}),
    model=Open("ViT fields a checkpoint cannot tell (layout, rematerialization, attention implementation) or, for a "
               "random or pre-trained teacher, its whole architecture (lalign/models/vit.py, ViT)"),
    pretrain=dict(
        steps=Field(4000, POSITIVE_INT, "pretrain stage: steps of the demo teacher's image-label training"),
        batch_size=Field(64, POSITIVE_INT, "pretrain stage: batch size"),
        crop_scale=Field((), pair(0, 1),
                         "train on random resized crops of this area fraction (labels: classes with at least "
                         "crop_min_visible of their pixels inside); (): whole scenes"),
        crop_min_visible=Field(0.5, within(0, 1), "see crop_scale"),
        optimizer=_optimizer(lr=3e-3, scaled=False, wd=1e-4, b2=0.999, warmup_steps=200, lr_min_ratio=0.01),
    ),
    maskembed=dict(
        sampler=Field("uniform", one_of(*maskembed.SAMPLERS), "how masks are drawn: uniform | bernoulli | block"),
        keep_prob=Field(0.5, within(0, 1, open_lo=True), "bernoulli: the probability that a patch is kept"),
        num_blocks=Field(1, POSITIVE_INT, "block: rectangles kept per mask"),
        antithetic=Field(True, BOOL, "add each mask's complement 1 - m"),
        include_ones=Field(True, BOOL, "add the all-ones mask"),
        target_layer=Field("penultimate", TARGET_LAYER,
                           "the teacher's tokens the student learns: the paper's 'penultimate' block + final norm, "
                           "'last', or a block number"),
        loss=Field("mse", one_of(*maskembed.LOSSES), "mse | cosine | l1 | mse_masked | mse_unmasked"),
        decoder_depth=Field(2, POSITIVE_INT, "transformer blocks of the MaskEmbed decoder"),
        decoder_ln_eps=Field(1e-5, or_none(within(0, 1, open_lo=True, open_hi=True), "the teacher's eps"),
                             "the decoder's LayerNorm eps: the reference's are torch's default (it builds them from "
                             "type(encoder.norm)); at init it moves the decoder's gradients by ~3% "
                             "(scripts/reference_parity.py)"),
        attn_softcap=Field(None, or_none(POSITIVE, "off"),
                           "Deviation: the reference caps attention logits at 30*tanh(x/30); HF, timm and open_clip "
                           "attention cannot, so the student trains as it will ship. Measured on the demo: the same "
                           "val loss with and without the cap (docs/design.md, 'Deviations'). 30.0 trains the "
                           "reference's way; export then measures it"),
        normalize_targets=Field(True, BOOL, "standardize the teacher's targets per feature (the reference's)"),
        whiten_targets=Field(False, BOOL,
                             "ZCA-whitened targets, every feature direction weighed equally (not the paper). On the "
                             "demo's 10 pre-registered seeds: the same locality gain as the paper's MSE, 1 point "
                             "more image mAP kept (docs/results.md, 'Pre-registered confirmation')"),
        target_std_batches=Field(4, POSITIVE_INT, "batches measuring the targets' statistics before training"),
        teacher_dtype=Field("bfloat16", one_of(*DTYPES), "the frozen teacher's compute dtype; '': float32"),
        student_dtype=Field("bfloat16", one_of(*DTYPES),
                            "the student's compute dtype ('': float32); its master weights stay float32"),
    ),
    total_steps=Field(math.ceil(RECIPE_EPOCHS * IMAGENET21K_IMAGES / RECIPE_BATCH), POSITIVE_INT,
                      "MaskEmbed steps: the recipe's 5 epochs of ImageNet-21k at batch 1024 = 64,227"),
    batch_size=Field(RECIPE_BATCH, POSITIVE_INT, "global batch size (all hosts)"),
    grad_accum_steps=Field(1, POSITIVE_INT,
                           ">1: the batch in that many micro-batches with the same gradient, for less memory per "
                           "chip"),
    optimizer=_optimizer(lr=None, scaled=True, wd=0.01, b2=0.95, warmup_steps=0, lr_min_ratio=0.1),
    watch=dict(
        source=Field("", keys_of("lalign.watch", "SOURCES"),
                     "the locality meter at each validation (lalign/watch.py): a ridge patch probe of student and "
                     "teacher on labelled images, logged beside val_loss. '': the student's token agreement only; "
                     "scenes | folder (images + label PNGs) | coco_stuff | ade20k (with root)"),
        images=Field("", TEXT, "folder: the images"),
        labels=Field("", TEXT, "folder: label PNGs, paired with the images by file stem"),
        num_classes=Field(0, OFF_OR_POSITIVE_INT, "folder: classes in the label PNGs"),
        ignore_index=Field(255, INT, "folder: the label of unlabelled pixels"),
        root=Field("", TEXT, "coco_stuff, ade20k: the data set's folder in its standard layout (validation split)"),
        label_rule=Field("union", one_of(*LABEL_RULES), "a patch's labels (lalign.data.segmentation)"),
        min_pixels=Field(1, POSITIVE_INT, "union: pixels of a class that put it in a patch"),
        num_images=Field(256, Rule(lambda v: _is_int(v) and v >= 4, "must be an integer >= 4"), "the watch set"),
        fit_fraction=Field(0.5, within(0, 1, open_lo=True, open_hi=True),
                           "the probe is fitted on this first part of the watch set and read on the rest"),
        ridge=Field(1e-3, POSITIVE, "ridge penalty on standardized features"),
        margin=Field(0.03, NON_NEGATIVE, "warn when the student's macro recall is this far below its teacher's"),
        batch_size=Field(64, POSITIVE_INT, "feature batch, rounded up to a multiple of the mesh's batch shards"),
    ),
    mesh=dict(
        data=Field(-1, INT, "data-parallel axis; -1: the devices the other axes leave"),
        fsdp=Field(1, POSITIVE_INT, "parameters, gradients and moments sharded over this many devices"),
        tensor=Field(1, POSITIVE_INT, "tensor-parallel axis"),
        num_devices=Field(0, OFF_OR_POSITIVE_INT, "use the first N devices; 0: all (tests, benchmarks)"),
    ),
    sharding_rules=Field((), Rule(lambda v: isinstance(v, (tuple, list)), "must be a tuple of (regex, spec)"),
                         "(regex, PartitionSpec) pairs; (): lalign.sharding.DEFAULT_RULES"),
    log_every=Field(50, POSITIVE_INT, "steps between progress lines and metrics.jsonl records"),
    eval_every=Field(2000, OFF_OR_POSITIVE_INT, "steps between validations (val_loss, the locality meter)"),
    checkpoint_every=Field(500, OFF_OR_POSITIVE_INT, "steps between checkpoints (and at every validation)"),
    val_batches=Field(10, POSITIVE_INT, "validation batches of batch_size"),
    async_checkpointing=Field(True, BOOL, "save checkpoints while training goes on"),
    quiet=Field(False, BOOL, "no progress lines (metrics.jsonl and TensorBoard still written)"),
    ablation=Field("", TEXT, "a name for what this run varies, saved in config.json: `lalign.report --group-by "
                             "ablation` groups runs by it (configs/demo_ablations.py)"),
    estimate=dict(
        slice=Field("", TEXT, "python -m lalign.memory: the slice the docstring's estimate assumes (its name)"),
        chip=Field("TPU v4", TEXT, "its chip (HBM and peak FLOP/s: lalign/memory.py)"),
        devices=Field(256, POSITIVE_INT, "its device count"),
        mfu=Field(0.4, within(0, 1, open_lo=True), "the model FLOP utilization the runtime estimate assumes"),
    ),
    probe=PROBE,
)


# `python -m lalign.probe --config=configs/probe/NAME.py`: one frozen backbone's patch probe.
PROBE_SCHEMA: dict = dict(
    backbone=Field("", TEXT, "the backbone checkpoint (any format lalign reads, or a lalign workdir); required"),
    backbone_format=Field("", TEXT, "its format; '' guesses it from the path"),
    model=Open("ViT fields a checkpoint cannot tell (None: from the checkpoint / big_vision's defaults)"),
    compute_dtype=Field("", one_of(*DTYPES), "feature extraction dtype, e.g. 'bfloat16' on accelerators; '': float32"),
    posemb_resize=Field("bicubic_antialias", one_of(*POSEMB_RESIZE),
                        "a checkpoint of another grid than data.image_size's (DINOv2: 37x37 at 518 px): its position "
                        "table resized as training resizes a teacher; 'none' refuses"),
    data=Open("the segmentation data: `name` and its options, their defaults in the table beside its reader "
              "(lalign/data/probe_splits.py, DATASETS)",
              choices=lambda: {n: d.options for n, d in probe_splits.DATASETS.items()}),
    features=dict(
        batch_size=Field(64, POSITIVE_INT, "images per feature-extraction batch"),
        store=Field("memory", one_of("memory", "disk"), "memory | disk (WORKDIR/features/*.npy memmaps)"),
        dtype=Field("float32", one_of("float32", "float16"), "stored feature dtype"),
    ),
    probe=PROBE,
    image_probe=Field(False, BOOL, "also a logistic regression per class on pooled features (slow at COCO scale)"),
)


# ------------------------------------------------------------------------------------------------ building it
def _defaults_of(section: dict) -> dict:
    return {name: (_defaults_of(spec) if isinstance(spec, dict) else dict(spec.default) if isinstance(spec, Open)
                   else spec.default) for name, spec in section.items()}


def _config_dict(section: dict) -> ml_collections.ConfigDict:
    values = _defaults_of(section)

    def placeholders(section: dict, values: dict) -> None:  # a None default still needs a type for --config.x=...
        for name, spec in section.items():
            if isinstance(spec, dict):
                placeholders(spec, values[name])
            elif isinstance(spec, Field) and spec.default is None:
                values[name] = config_dict.placeholder(float)

    placeholders(section, values)
    return ml_collections.ConfigDict(values)


# Sections only their stage (of the same name) reads: present in a config that runs the stage.
STAGE_SECTIONS = ("pretrain", "probe")


def _for_stages(schema: dict, stages) -> dict:
    if schema is not SCHEMA:
        return schema
    return {k: v for k, v in schema.items() if k not in STAGE_SECTIONS or k in stages}


def defaults(stages=("maskembed",)) -> ml_collections.ConfigDict:
    """Every field at its default, for a run of `stages`: what an experiment config starts from."""
    c = _config_dict(_for_stages(SCHEMA, stages))
    c.stages = tuple(stages)
    return c


def probe_defaults() -> ml_collections.ConfigDict:
    """Every field of a `lalign.probe` config at its default: what configs/probe/*.py start from."""
    return _config_dict(PROBE_SCHEMA)


def _as_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def schema_of(config) -> dict:
    """The schema `config` follows: a probe config names a backbone, a run config does not."""
    return PROBE_SCHEMA if "backbone" in config else SCHEMA


def errors(config, schema: Optional[dict] = None) -> list[str]:
    """Every field of `config` that breaks its rule or is not a field (empty: fine); `schema`: SCHEMA or
    PROBE_SCHEMA (default: the one `config` follows)."""
    schema = schema_of(config) if schema is None else schema
    out = []

    def walk(section: dict, values, path: str):
        if not isinstance(values, dict):
            out.append(f"{path.rstrip('.')} must be a section (a dict), got {values!r}")
            return
        for name in values:
            if name not in section:
                close = difflib.get_close_matches(name, list(section), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; its fields: {', '.join(section)}"
                where = path.rstrip(".") if path != "config." else "the config"
                out.append(f"{path}{name} is not a field of {where}{hint}")
        for name, spec in section.items():
            if name not in values:
                continue
            if isinstance(spec, dict):
                walk(spec, values[name], f"{path}{name}.")
            elif isinstance(spec, Field) and not spec.rule.ok(values[name]):
                out.append(f"{path}{name} {spec.rule.says}, got {values[name]!r}")

    values = _as_dict(config)
    walk(schema, values, "config.")
    if schema is SCHEMA:
        stages = values.get("stages") if isinstance(values.get("stages"), (tuple, list)) else ()
        for stage in STAGE_SECTIONS:
            if stage in stages and stage not in values:
                out.append(f"config.{stage} is needed by the {stage!r} stage (python -m lalign.config lists its "
                           f"fields)")
    return out


def complete(config, schema: Optional[dict] = None):
    """`config` with every field it leaves out at its default (in place for a ConfigDict; returned)."""
    schema = schema_of(config) if schema is None else schema

    def fill(section: dict, values):
        for name, spec in section.items():
            if name not in values:
                values[name] = (_defaults_of(spec) if isinstance(spec, dict) else
                                dict(spec.default) if isinstance(spec, Open) else spec.default)
            elif isinstance(spec, dict) and isinstance(values[name], (dict, ml_collections.ConfigDict)):
                fill(spec, values[name])

    stages = config.get("stages") or SCHEMA["stages"].default
    with config.unlocked() if isinstance(config, ml_collections.ConfigDict) else contextlib.nullcontext():
        fill(_for_stages(schema, stages), config)
    return config


def completed(config, schema: Optional[dict] = None) -> ml_collections.ConfigDict:
    """A completed copy of `config` (a ConfigDict or a dict); `config` is left as it is."""
    schema = schema_of(config) if schema is None else schema
    return complete(ml_collections.ConfigDict(_as_dict(config)), schema)


# ------------------------------------------------------------------------------------------------ describing it
def describe(config=None, schema: Optional[dict] = None) -> str:
    """Every field, its default and meaning; with `config`, its value where it differs from the default (`*`)."""
    schema = (SCHEMA if config is None else schema_of(config)) if schema is None else schema
    values = _as_dict(config) if config is not None else None
    lines = []

    def walk(section: dict, given, path: str):
        for name, spec in section.items():
            here = given.get(name) if isinstance(given, dict) else None
            if isinstance(spec, dict):
                lines.append(f"\n{path}{name}:")
                walk(spec, here, f"{path}{name}.")
                continue
            if isinstance(spec, Open):
                lines.append(f"\n{path}{name}:  {spec.doc}")
                open_section(spec, here, f"{path}{name}.")
                continue
            text = f"{path}{name} = {spec.default!r}"
            if given is not None and name in given and here != spec.default and not (
                    isinstance(here, (list, tuple)) and tuple(here) == tuple(spec.default or ())):
                text += f"   * {here!r}"
            lines.append(f"{text}\n    {spec.doc}" + (f" ({spec.rule.says.replace('must be ', '')})"
                                                       if spec.rule.says else ""))

    def open_section(spec: Open, given, path: str):
        kinds = spec.choices() if spec.choices else {}
        name = given.get("name") if isinstance(given, dict) else None
        if name in kinds:  # the config's own kind: each option at its default, the config's value marked
            lines.append(f"{path}name = {name!r}")
            for key, default in kinds[name].items():
                mark = f"   * {given[key]!r}" if key in given and given[key] != default and not (
                    isinstance(default, tuple) and tuple(given[key] or ()) == default) else ""
                lines.append(f"{path}{key} = {default!r}{mark}")
        elif kinds:
            for kind, options in kinds.items():
                lines.append(f"  name={kind!r}: " + ", ".join(f"{k}={v!r}" for k, v in options.items()))
        elif isinstance(given, dict):
            lines.extend(f"{path}{k} = {v!r}" for k, v in given.items())

    walk(schema, values, "")
    return "\n".join(lines).lstrip("\n")


USAGE = ("usage: python -m lalign.config [--probe] [configs/NAME.py[:ARG]]\n"
         "  every field of a run config (--probe: of a `lalign.probe` config), its default and meaning;\n"
         "  with a config, `*` marks the values it changes, and a field that breaks its rule is an ERROR line\n"
         "  (exit 1).")


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    probe = "--probe" in argv
    argv = [a for a in argv if a != "--probe"]
    if len(argv) > 1 or any(a.startswith("-") for a in argv):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        config = load(argv[0]) if argv else None
    except (FileNotFoundError, ValueError) as e:
        print(f"lalign.config: {e}", file=sys.stderr)
        return 2
    print(describe(config, PROBE_SCHEMA if probe else None))
    problems = errors(config) if config is not None else []
    for p in problems:
        print(f"ERROR {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
