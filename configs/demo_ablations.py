"""Ablations on the embedded demo: one MaskEmbed setting changed at a time from the demo default.

    python -m lalign.main --config=configs/demo_ablations.py:bernoulli_p25 --workdir=DIR --config.seed=0
    python scripts/run_ablations.py --out=/tmp/ablations --teachers=/tmp/runs/final_last_s{seed}   # all x 3 seeds
    python -m lalign.report --workdirs /tmp/ablations/*_s? --group-by ablation --out /tmp/ablations_report

Settings (the arg; `baseline` is configs/demo.py unchanged):
  sampler:      baseline (uniform antithetic), bernoulli_p25 / _p50 / _p75 (keep probability), block (one kept
                rectangle per mask, + complement)
  target layer: target_penultimate (the paper's default: penultimate block output + final norm)
  loss:         loss_cosine, loss_masked (MSE over masked-out patch tokens only)
  decoder:      decoder_depth1, decoder_depth4 (baseline 2)
  all-ones:     no_ones (no all-ones mask; masks and complements only)
  targets:      whiten (ZCA-whitened teacher targets instead of dividing by their std); whiten_lr_1e-3 (and lr 1e-3)
  budget:       steps_x4 (8,000 MaskEmbed steps instead of 2,000), lr_1e-3 (peak lr 1e-3 instead of 3e-4)
  scenes:       scenes_64 (64 px scenes, 8x8 patches, same digits: a new teacher), scenes_64_whiten (and whitened),
                colours_3 (digit x colour, 30 classes: a new teacher)
  teacher:      teacher_crop (teacher pre-trained on random resized crops of 1/4 to all of each scene),
                teacher_crop_whiten (and whitened targets), teacher_crop_long (crop teacher, 3x pre-training steps),
                teacher_long (plain teacher, 3x pre-training steps: the control for teacher_crop_long)

Runtime: ~4 min of MaskEmbed + ~1 min of probe per run on 2 CPU cores, with the teacher (and its probe) reused from
a demo run of the same seed (the runner copies them). Deviation from configs/demo.py for cost: the patch probe runs
one probe seed (0) instead of three; baseline and teacher are probed the same way, so comparisons are like for like.
Results: docs/results.md, one section per setting ("Mask sampler", "Target layer", "Loss: ...").
"""
import importlib.util
import os

def _maskembed(**change):
    return dict(maskembed=change)


# Each setting: the config entries it changes (nested like the config), everything else as configs/demo.py.
SETTINGS = {
    "baseline": {},
    "bernoulli_p25": _maskembed(sampler="bernoulli", keep_prob=0.25),
    "bernoulli_p50": _maskembed(sampler="bernoulli", keep_prob=0.5),
    "bernoulli_p75": _maskembed(sampler="bernoulli", keep_prob=0.75),
    "block": _maskembed(sampler="block", num_blocks=1),
    "target_penultimate": _maskembed(target_layer="penultimate"),
    "loss_cosine": _maskembed(loss="cosine"),
    "loss_masked": _maskembed(loss="mse_masked"),
    "decoder_depth1": _maskembed(decoder_depth=1),
    "decoder_depth4": _maskembed(decoder_depth=4),
    "no_ones": _maskembed(include_ones=False),
    # The budget, and a loss that weighs every feature direction equally (docs/results.md, "Training length and
    # learning rate", "Loss: MSE, cosine, masked-only, whitened").
    "steps_x4": dict(total_steps=8000),  # 4x longer MaskEmbed (same schedule shape)
    "lr_1e-3": dict(optimizer=dict(lr=1e-3)),
    "whiten": _maskembed(whiten_targets=True),  # ZCA-whitened targets: low-variance directions count as much
    "whiten_lr_1e-3": dict(_maskembed(whiten_targets=True), optimizer=dict(lr=1e-3)),  # the two best together
    # Settings that change the teacher (docs/results.md, "Teacher strength and pre-training crops", "Scene size
    # and classes") pre-train their own (run them with
    # lalign.main; the runner then shares those teachers with their _whiten variant, and refuses other teachers).
    # 64 px = 8x8 patches (1.8x the tokens), digits the same size, so objects cover less of the image and a
    # background patch is further from every object.
    "scenes_64": dict(data=dict(image_size=64)),
    "scenes_64_whiten": dict(data=dict(image_size=64), **_maskembed(whiten_targets=True)),
    # A teacher trained on random resized crops (1/4 to all of the scene): it has seen partial images and
    # objects at other scales before MaskEmbed asks it about masked ones. Also a new teacher.
    "teacher_crop": dict(pretrain=dict(crop_scale=(0.25, 1.0))),
    "teacher_crop_whiten": dict(pretrain=dict(crop_scale=(0.25, 1.0)), **_maskembed(whiten_targets=True)),
    # The crop teacher trained 3x longer, until it is about as strong on whole scenes as the plain one: separates
    # "has seen partial images" from "is weaker" (the crop teacher at 4,000 steps is ~9 points behind).
    "teacher_crop_long": dict(pretrain=dict(crop_scale=(0.25, 1.0), steps=12000)),
    # More classes: digit x colour (3 colours of a fixed palette, 30 classes), so a patch's label needs its own
    # pixels (the colour) as well as the digit's shape. A new teacher.
    "colours_3": dict(data=dict(num_colours=3)),
    # The plain teacher trained 3x longer (12,000 steps): the control for teacher_crop_long. If MaskEmbed only adds
    # where patch features are under-trained, a stronger plain teacher should leave no gain either. A new teacher.
    "teacher_long": dict(pretrain=dict(steps=12000)),
}


def _demo_config(arg: str):
    spec = importlib.util.spec_from_file_location("demo", os.path.join(os.path.dirname(__file__), "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "baseline"):
    """`NAME` or `NAME,smoke` / `NAME,tiny` (a small size of the same setting, for tests)."""
    name, _, size = (arg or "baseline").partition(",")
    if name not in SETTINGS:
        raise ValueError(f"configs/demo_ablations.py: unknown setting {name!r}; choose from {sorted(SETTINGS)}.")
    c = _demo_config(size or "full")
    size_steps = c.total_steps
    c.ablation = name  # what `lalign.report --group-by ablation` groups by
    c.update(SETTINGS[name])
    if size:  # smoke/tiny check that a setting runs, not its result: keep their short MaskEmbed
        c.total_steps = size_steps
    c.probe.seeds = (0,)
    return c
