"""The real configs: the paper's recipe in every field, their docstring estimates current, and each `:smoke`
built, sharded on the 8 fake CPU devices over all three mesh axes and run for 2 MaskEmbed steps."""
import json
import math
import os

import jax
import ml_collections
import numpy as np
import pytest
from conftest import ROOT, load_config
from PIL import Image

from lalign import maskembed, memory, pipeline
from lalign.checkpoints.normalization import family_normalization
from lalign.configs.demo_ablations import SETTINGS
from lalign.models.vit import vit_from_config

REAL = ("siglip_so400m", "siglip_b16", "clip_l14_336", "clip_b16", "dinov2_b14")
EXPECTED = {  # name: (variant, image size, lr, pool, family)
    "siglip_so400m": ("So400m/14", 384, 2e-4, "map", "siglip"),
    "siglip_b16": ("B/16", 224, 3e-4, "map", "siglip"),
    "clip_l14_336": ("L/14", 336, 2e-4, "tok", "clip"),
    "clip_b16": ("B/16", 224, 3e-4, "tok", "clip"),
    "dinov2_b14": ("B/14", 224, 3e-4, "tok", "dinov2"),  # the reference's configs/dinov2-vit-b.yaml
}
# The normalization a teacher of each family gets where its checkpoint states none (checkpoints/normalization.py).
FAMILY_NORMALIZATION = {"siglip": "siglip", "clip": "clip", "dinov2": "imagenet"}


@pytest.mark.parametrize("name", REAL)
def test_full_config_is_the_papers_recipe(name):
    c = load_config(f"configs/{name}.py", "full")
    variant, size, lr, pool, family = EXPECTED[name]
    assert c.stages == ("maskembed",) and c.init_from == ""
    assert c.model.variant == variant and c.model.pool_type == pool and c.model.scan
    # normalization "": the teacher checkpoint's (pipeline.resolve_normalization), as the reference's timm data config
    assert c.data.name == "image_folder" and c.data.image_size == size and c.data.normalization == ""
    assert tuple(c.data.crop_scale) == (0.08, 1.0) and c.data.flip
    # the reference's timm crop, its --train-interpolation random, and the teacher's bicubic for validation
    assert (c.data.train_crop_mode, c.data.train_interpolation, c.data.interpolation) == ("rkrc", "random", "bicubic")
    assert "probe" not in c  # probing is `python -m lalign.probe` with its own data config
    assert c.batch_size == 1024 and c.total_steps == math.ceil(5 * 13_153_500 / 1024) == 64_227
    o = c.optimizer
    assert (o.lr, o.b1, o.b2, o.wd, o.grad_clip, o.warmup_steps, o.lr_min_ratio) == (lr, 0.9, 0.95, 0.01, 1.0, 0, 0.1)
    assert o.weight_decay_on == "all"  # the reference decays every parameter
    assert (o.lr_base_batch, o.lr_scale_rule) == (1024, "sqrt")  # the recipe's lr belongs to its batch
    m = c.maskembed
    assert m.target_layer == "penultimate" and m.teacher_dtype == m.student_dtype == "bfloat16"
    assert (m.sampler, m.antithetic, m.include_ones, m.loss, m.decoder_depth) == ("uniform", True, True, "mse", 2)
    if variant in ("So400m/14", "L/14"):
        assert c.model.remat_policy == "nothing_saveable"
    model = vit_from_config(c)
    assert family_normalization(model)[0] == FAMILY_NORMALIZATION[family]
    assert model.has_class_token == (family != "siglip")
    if family == "clip":
        assert (model.pre_norm, model.cls_posemb, model.act, model.ln_eps, model.patch_bias) == (
            True, True, "quick_gelu", 1e-5, False)
    elif family == "dinov2":  # timm's vit_base_patch14_reg4_dinov2: registers without position rows, LayerScale
        assert (model.num_registers, model.cls_posemb, model.layerscale_init, model.act, model.ln_eps,
                model.pre_norm, model.patch_size) == (4, False, 1e-5, "gelu_exact", 1e-6, False, (14, 14))
        assert c.init_posemb_resize == "bicubic_antialias"  # its 37x37 table to 16x16, as timm loads it
    else:
        assert (model.pre_norm, model.act, model.ln_eps) == (False, "gelu", 1e-6)


@pytest.mark.parametrize("name", REAL)
def test_docstring_estimate_is_what_the_memory_script_prints(name):
    """The table in each config's docstring is generated (`python -m lalign.memory --update_docstring`)."""
    path = os.path.join(ROOT, "configs", f"{name}.py")
    with open(path) as f:
        block = memory.docstring_block(f.read())
    assert block, f"{path}: no estimate block"
    assert block == memory.report(load_config(f"configs/{name}.py", "full")), (
        f"{path}: stale estimate; run python -m lalign.memory --config=configs/{name}.py --update_docstring")


def test_memory_estimate_counts_the_real_parameters():
    c = load_config("configs/siglip_so400m.py", "full")
    e = memory.estimate(c, devices=256)
    assert e["mesh"] == {"data": 16, "fsdp": 16, "tensor": 1} and e["images_per_device"] == 4
    assert 425e6 < e["teacher_params"] < 430e6  # So400m/14 at 384 with its MAP head: 428M
    assert 410e6 < e["student_params"] < 415e6  # without the head (15M)
    b = e["bytes"]
    # AdamW keeps two fp32 moments per trainable parameter; FSDP over 16 shards all but small leaves.
    assert b["adamw"] == pytest.approx(2 * b["params"], rel=0.01)
    assert b["params"] == pytest.approx(e["trainable_params"] * 4 / 16, rel=0.02)
    assert b["teacher"] == pytest.approx(e["teacher_params"] * 26 / 27 * 2 / 16, rel=0.05)  # 26 blocks, bf16
    # Remat keeps block inputs only: the student's activations are a fraction of the unrematerialized ones.
    c.model.remat_policy = "none"
    assert memory.estimate(c, devices=256)["activations_per_image"]["student"] > 10 * e[
        "activations_per_image"]["student"]
    with pytest.raises(ValueError, match="12 devices are not divisible by 16"):
        memory.estimate(load_config("configs/siglip_so400m.py", "full"), devices=12)


def _image_folder(root, rng):
    """12 images of varied sizes in 3 class folders, JPEG and PNG, and one corrupt file."""
    for i in range(12):
        d = root / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(24, 90, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "class0" / "corrupt.jpg").write_bytes(b"not a jpeg")
    return str(root)


@pytest.mark.filterwarnings("ignore::lalign.data.images.CorruptImageWarning")
@pytest.mark.parametrize("name", REAL)
def test_smoke_config_shards_on_8_devices_and_trains_2_steps(name, tmp_path):
    c = load_config(f"configs/{name}.py", "smoke")
    assert c.stages == ("maskembed",) and c.init_from == "random" and c.total_steps == 2
    c.mesh = dict(data=2, fsdp=2, tensor=2, num_devices=0)  # every mesh axis in use
    c.quiet = True
    if name == "siglip_b16":
        # One of the four runs reads what the full configs read: an image folder (RRC + flip, normalization,
        # a corrupt file skipped), at the smoke size; the other three read the smoke config's own scenes.
        full = load_config(f"configs/{name}.py", "full")
        path = _image_folder(tmp_path / "images", np.random.default_rng(0))
        c.data = dict(full.data, path=path, num_val=4, image_size=c.data.image_size, num_workers=2)
    summary = pipeline.run(c, str(tmp_path / "run"))
    assert summary["maskembed"]["step"] == 2 and np.isfinite(summary["maskembed"]["best_val_loss"])
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


@pytest.mark.parametrize("name", REAL)
def test_bad_config_arg_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"configs/{name}.py takes 'full'.*'smoke'.*, got 'tiny'"):
        load_config(f"configs/{name}.py", "tiny")


def test_ablation_configs_change_only_their_setting_from_the_demo():
    def flat(tree, prefix=""):
        return {k2: v2 for k, v in dict(tree).items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}

    demo = flat(load_config("configs/demo.py", "full").to_dict())
    for name, change in SETTINGS.items():
        c = load_config("configs/demo_ablations.py", name)
        assert c.ablation == name and c.probe.seeds == (0,)
        got = flat(c.to_dict())
        differs = {k for k in got if k not in ("ablation", "probe.seeds") and got[k] != demo[k]}
        assert differs == {k for k, v in flat(change).items() if demo[k] != v}, name
    assert load_config("configs/demo_ablations.py", "steps_x4,smoke").total_steps == \
        load_config("configs/demo.py", "smoke").total_steps
    assert load_config("configs/demo_ablations.py", "block,tiny").data.image_size == 16
    with pytest.raises(ValueError, match="unknown setting 'bernoulli'"):
        load_config("configs/demo_ablations.py", "bernoulli")


def test_ablation_runner_refuses_a_teacher_of_other_scenes_or_seed(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import run_ablations

    demo = load_config("configs/demo.py", "full")
    (tmp_path / "config.json").write_text(demo.to_json_best_effort())  # what lalign.main saves in a workdir
    run_ablations.check_teacher(str(tmp_path), "whiten", 0)  # a MaskEmbed setting: same teacher, fine
    saved = json.loads(demo.to_json_best_effort())
    del saved["pretrain"]["crop_scale"], saved["pretrain"]["crop_min_visible"]  # a run from before they existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    run_ablations.check_teacher(str(tmp_path), "whiten", 0)  # ran with their defaults: the same teacher
    with pytest.raises(ValueError, match=r"unlike setting 'scenes_64'.*\['data'\]"):
        run_ablations.check_teacher(str(tmp_path), "scenes_64", 0)
    with pytest.raises(ValueError, match=r"\['seed'\]"):
        run_ablations.check_teacher(str(tmp_path), "whiten", 1)


def test_ablation_runner_gives_each_setting_the_probes_already_computed(tmp_path, monkeypatch):
    """The baseline is the demo run itself: it gets that run's checkpoints and both probe results; another setting
    gets the teacher's probe only (the pipeline reuses a copied result only if its key matches the run)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import run_ablations

    source = tmp_path / "demo_s0"
    for sub in ("teacher", "checkpoints/best", "probe"):
        (source / sub).mkdir(parents=True)
    (source / "config.json").write_text(load_config("configs/demo.py", "full").to_json_best_effort())
    for name in ("teacher", "aligned"):
        (source / "probe" / f"{name}.json").write_text(json.dumps({"key": name}))
    teachers = str(tmp_path / "demo_s{seed}")
    base = run_ablations.prepare(str(tmp_path / "out"), "baseline", 0, teachers, {})
    assert sorted(os.listdir(os.path.join(base, "probe"))) == ["aligned.json", "teacher.json"]
    assert os.path.isdir(os.path.join(base, "checkpoints", "best")) and os.path.isdir(os.path.join(base, "teacher"))
    white = run_ablations.prepare(str(tmp_path / "out"), "whiten", 0, teachers, {})
    assert os.listdir(os.path.join(white, "probe")) == ["teacher.json"]
    assert not os.path.exists(os.path.join(white, "checkpoints"))


def _what_the_setting_does(name: str, me) -> None:
    """Checks, on masks and losses drawn from the run's recorded `maskembed` config, the property the setting is
    named for."""
    grid = (4, 4)
    masks = np.asarray(maskembed.sample_masks(jax.random.key(0), 512, grid, me))  # (B, M, N)
    if name == "bernoulli_p25":  # a quarter of the patches kept, then the complement and the all-ones mask
        assert abs(masks[:, 0].mean() - 0.25) < 0.02 and (masks[:, 1] == ~masks[:, 0]).all() and masks[:, 2].all()
    if name == "block":  # the kept patches of each sampled mask are one rectangle (their bounding box, filled)
        for m in masks[:64, 0].reshape(-1, *grid):
            rows, cols = np.nonzero(m)
            assert m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    if name == "no_ones":  # a mask and its complement, and no third, all-ones mask
        assert masks.shape[1] == 2 and (masks[:, 1] == ~masks[:, 0]).all()
    if name == "loss_masked":  # errors on kept patches cost nothing, errors on dropped ones do
        keep = masks[:2, :1].astype(np.float32)  # (2, 1, N): two images' first masks
        target = np.zeros((2, 1, grid[0] * grid[1], 3), np.float32)
        on_kept, on_dropped = target + keep[..., None], target + (1 - keep[..., None])
        assert float(maskembed.maskembed_loss(on_kept, target, keep, me.loss)) == 0.0
        assert float(maskembed.maskembed_loss(on_dropped, target, keep, me.loss)) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ("bernoulli_p25", "block", "loss_masked", "no_ones"))
def test_ablation_settings_train_with_what_they_name(name, tmp_path):
    c = load_config("configs/demo_ablations.py", f"{name},tiny")
    c.stages = ("pretrain", "maskembed")
    summary = pipeline.run(c, str(tmp_path))
    assert summary["maskembed"]["step"] == c.total_steps and np.isfinite(summary["maskembed"]["best_val_loss"])
    recorded = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))
    changed = SETTINGS[name]["maskembed"]
    assert {k: recorded.maskembed[k] for k in changed} == changed  # the run was given the setting
    _what_the_setting_does(name, recorded.maskembed)


def test_memory_estimate_counts_the_target_statistics_pass():
    """Before training the teacher runs on whole batches for the target statistics; with micro-batches the step
    holds fewer images at once, and that pass can be the peak."""
    from lalign import memory

    c = load_config("configs/siglip_so400m.py", "full")
    plain = memory.estimate(c)["bytes"]
    c.grad_accum_steps = 4
    b = memory.estimate(c)["bytes"]
    assert b["target_stats"] == plain["target_stats"] > 0  # micro-batching does not shrink that pass
    assert b["activations"] < b["target_stats"] < plain["activations"]
    assert b["total"] == b["params"] + b["grads"] + b["adamw"] + b["teacher"] + b["full_teacher"] + b["target_stats"]


# ------------------------------------------------------------------------- the learning rate follows the batch
def test_lr_is_scaled_from_the_batch_it_belongs_to():
    from lalign.optim import make_optimizer, peak_lr

    recipe = load_config("configs/siglip_b16.py", "full").optimizer  # lr 3e-4 at batch 1024, sqrt rule
    assert peak_lr(recipe, 1024) == (3e-4, "")  # the recipe's batch: nothing changes, nothing said
    lr, note = peak_lr(recipe, 4)
    assert lr == pytest.approx(3e-4 * (4 / 1024) ** 0.5) and f"{lr:.2g}" == "1.9e-05"
    assert note == "lr 0.0003 is for batch 1024; batch 4 → lr 1.9e-05 (sqrt rule)"
    assert peak_lr(dict(recipe, lr_scale_rule="linear"), 4)[0] == pytest.approx(3e-4 * 4 / 1024)
    assert peak_lr(dict(recipe, lr_scale_rule="linear"), 2048)[0] == pytest.approx(6e-4)
    lr, note = peak_lr(dict(recipe, lr_scale_rule="none"), 4)
    assert lr == 3e-4
    assert note == "lr 0.0003 is for batch 1024; batch 4 → lr 0.0003 (lr_scale_rule 'none': not scaled)"
    assert peak_lr(dict(recipe, lr_base_batch=0), 4) == (3e-4, "")  # 0: lr as given at any batch
    assert peak_lr({"lr": 1e-3}, 4) == (1e-3, "")  # an optimizer config without the fields (pretrain's)
    demo = load_config("configs/demo.py", "full")
    assert (demo.optimizer.lr, demo.optimizer.lr_base_batch, demo.batch_size) == (3e-4, 32, 32)  # unchanged
    assert peak_lr(demo.optimizer, 4)[0] == pytest.approx(3e-4 / 8 ** 0.5)
    _, schedule = make_optimizer(recipe, 100, 4)  # the schedule's peak is the scaled lr, its floor a tenth of it
    assert float(schedule(0)) == pytest.approx(3e-4 * (4 / 1024) ** 0.5, rel=1e-6)
    assert float(schedule(100)) == pytest.approx(0.1 * 3e-4 * (4 / 1024) ** 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="lr_scale_rule must be one of .*'sqrt'.*got 'cube'"):
        peak_lr(dict(recipe, lr_scale_rule="cube"), 4)


def test_a_run_at_another_batch_says_how_its_lr_was_scaled(tmp_path, capsys):
    from lalign.pretrain import pretrain_teacher
    from lalign.train import train_maskembed

    c = load_config("configs/demo.py", "tiny")
    c.update(total_steps=2, eval_every=0, log_every=1)
    c.optimizer.lr_base_batch = 32
    teacher = pretrain_teacher(c, str(tmp_path / "teacher"))
    capsys.readouterr()
    train_maskembed(c, str(tmp_path / "run"), *teacher)
    assert "[maskembed] lr 0.0003 is for batch 32; batch 8 → lr 0.00015 (sqrt rule)" in capsys.readouterr().out
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        lrs = [json.loads(line)["lr"] for line in f if '"lr"' in line]
    assert lrs[0] == pytest.approx(1.5e-4, rel=1e-6)  # step 1 logs the step-0 lr: the peak


def test_config_check_of_the_lr_fields_and_a_resume_from_before_they_existed(tmp_path):
    from lalign import validate

    c = load_config("configs/demo.py", "full")
    c.optimizer.update(lr_base_batch=-1, lr_scale_rule="cube")
    errors = validate.config_errors(c, 1)
    assert any("config.optimizer.lr_base_batch must be 0" in e and "got -1" in e for e in errors), errors
    assert any("config.optimizer.lr_scale_rule must be one of ('sqrt', 'linear', 'none'), got 'cube'" in e
               for e in errors), errors
    # A workdir whose config.json predates the fields ran with its lr as given: it resumes when the lr is unchanged
    c = load_config("configs/demo.py", "full")
    (tmp_path / "checkpoints" / "latest" / "500").mkdir(parents=True)
    saved = json.loads(c.to_json_best_effort())
    del saved["optimizer"]["lr_base_batch"], saved["optimizer"]["lr_scale_rule"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert validate.resume_errors(c, str(tmp_path)) == []  # batch 32: lr 3e-4 either way
    c.batch_size = saved["batch_size"] = 4
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (error,) = validate.resume_errors(c, str(tmp_path))  # batch 4: 3e-4 then, 1.06e-4 now
    assert error.startswith("optimizer: ") and '"peak lr": 0.0003}' in error and '"peak lr": 0.000106' in error


def test_the_demo_and_the_real_configs_turn_the_locality_meter_on():
    from lalign import validate, watch

    demo = load_config("configs/demo.py", "full")
    assert (demo.watch.source, demo.watch.num_images, demo.watch.margin) == ("scenes", 256, 0.03)
    assert watch.labelled(watch.options(demo)) and not validate.config_errors(demo, 1)
    for name in REAL:  # a labelled folder the user names; none given: the token agreement only
        c = load_config(f"configs/{name}.py", "full")
        assert (c.watch.source, c.watch.images, c.watch.num_images) == ("folder", "", 256)
        assert not watch.labelled(watch.options(c))
        c.watch.update(images="/data/watch/images", labels="/data/watch/labels", num_classes=182)
        assert watch.labelled(watch.options(c)) and not watch.config_errors(c)

