"""A run records the model it trains and the normalization it trains with (WORKDIR/resolved.json), and the tools
read that record: a DINOv2 teacher from a recipe written for another family exports and probes with no model flag,
and a flag that contradicts the record is refused. The normalization comes from what the checkpoint says (the real
transformers image processors' preprocessor_config.json, timm's pretrained_cfg), else from its family."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from lalign import export, pipeline, teacher as teacher_lib, validate
from lalign.checkpoints import bigvision, load, normalization
from lalign.models.vit import ViT

from interop import TOL, images, maxdiff, nchw, randomize_torch

IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # facebook/dinov2-*'s file


def _hf_dir(torch, transformers, directory, family: str, registers: int = 0, processor=True, **processor_kw):
    """A random tiny HF vision model of `family` saved with save_pretrained, and beside it the preprocessor config
    its real image processor writes (DINOv2's hub files: BitImageProcessor with ImageNet statistics)."""
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    if family == "dinov2":
        kw.update(mlp_ratio=4, image_size=98, patch_size=14)  # a 7x7 table, as the real 37x37 at 518 px
        model = (transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            num_register_tokens=registers, **kw)) if registers else transformers.Dinov2Model(
            transformers.Dinov2Config(**kw)))
        proc = transformers.BitImageProcessor(**{**IMAGENET, "size": {"shortest_edge": 256},
                                                 "crop_size": {"height": 224, "width": 224}, **processor_kw})
    elif family == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(intermediate_size=64, image_size=32,
                                                                               patch_size=8, **kw))
        proc = transformers.SiglipImageProcessor(**processor_kw)
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(intermediate_size=64, image_size=32,
                                                                           patch_size=8, **kw))
        proc = transformers.CLIPImageProcessor(**processor_kw)
    model = randomize_torch(torch, model)
    model.save_pretrained(directory)
    if processor:
        proc.save_pretrained(directory)
    return model


@pytest.mark.parametrize("family,expected", [("dinov2", "imagenet"), ("siglip", "siglip"), ("clip", "clip")])
def test_hf_normalization_is_what_the_image_processor_wrote(family, expected, torch, transformers, tmp_path):
    _hf_dir(torch, transformers, tmp_path / "with", family)
    name, source = load.checkpoint_normalization(str(tmp_path / "with"))
    assert name == expected and source.endswith("preprocessor_config.json image_mean/image_std")
    _hf_dir(torch, transformers, tmp_path / "without", family, processor=False)  # the model_type's family
    assert load.checkpoint_normalization(str(tmp_path / "without"))[0] == expected
    # the probe: "" and "auto" read the checkpoint, a name wins
    from lalign.probe.features import normalization_for

    model, _ = load.load_any(str(tmp_path / "with"))
    assert normalization_for(model, "auto", str(tmp_path / "with"), "hf") == expected
    assert normalization_for(model, "siglip", str(tmp_path / "with"), "hf") == "siglip"


def test_statistics_lalign_cannot_normalize_with_are_a_clear_error(torch, transformers, tmp_path):
    _hf_dir(torch, transformers, tmp_path / "d", "dinov2", image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match=r"preprocessor_config.json: mean \[0.4, 0.4, 0.4\], std \[0.2, 0.2, 0.2\] is "
                                         r"none of lalign's normalizations.*set config.data.normalization"):
        load.checkpoint_normalization(str(tmp_path / "d"))


@pytest.mark.parametrize("name,expected", [("vit_small_patch14_reg4_dinov2", "imagenet"),
                                           ("vit_base_patch16_siglip_224", "siglip"),
                                           ("vit_base_patch16_clip_224.openai", "clip")])
def test_timm_normalization_is_its_pretrained_cfg_else_its_family(name, expected, torch, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    from timm.models import _hub

    t = timm.create_model(name, pretrained=False, embed_dim=48, depth=2, num_heads=3)
    _hub.save_for_hf(t, str(tmp_path / "hub"), safe_serialization=True)  # timm's hub layout: config.json beside
    got, source = load.checkpoint_normalization(str(tmp_path / "hub" / "model.safetensors"), "timm")
    assert got == expected and source.endswith("config.json pretrained_cfg mean/std")
    save_file(t.state_dict(), str(tmp_path / "bare.safetensors"))  # no config: the family by the keys
    assert load.checkpoint_normalization(str(tmp_path / "bare.safetensors"))[0] == expected


@pytest.mark.parametrize("fields,expected", [
    (dict(pool_type="map"), "siglip"),
    (dict(pool_type="tok", pre_norm=True, cls_posemb=True), "clip"),
    (dict(pool_type="tok", class_token=True, num_registers=2, layerscale_init=1e-5), "imagenet"),
    (dict(pool_type="tok"), "imagenet"),  # a plain ViT (augreg, DeiT, MAE): ImageNet's
])
def test_big_vision_npz_normalization_is_its_family(fields, expected, tmp_path):
    model = ViT(patch_size=(4, 4), width=16, depth=1, mlp_dim=32, num_heads=2, **fields)
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8, 8, 3)))["params"]
    bigvision.save_npz(str(tmp_path / "m.npz"), params)
    assert load.checkpoint_normalization(str(tmp_path / "m.npz"))[0] == expected
    assert normalization.family_normalization(model)[0] == expected


def _image_folder(root):
    rng = np.random.default_rng(0)
    for i in range(12):
        d = root / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (70, 80, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return str(root)


@pytest.fixture(scope="module")
def dinov2_run(tmp_path_factory, torch, transformers):
    """configs/siglip_b16.py:smoke on an image folder with init_from = a tiny random HF DINOv2 with registers (exact
    GELU, eps 1e-6, LayerScale, a 7x7 table resized to the run's 4x4): what a newcomer with a DINOv2 runs."""
    root = tmp_path_factory.mktemp("dinov2_run")
    _hf_dir(torch, transformers, root / "dinov2", "dinov2", registers=2)
    c = load_config("configs/siglip_b16.py", "smoke")
    full = load_config("configs/siglip_b16.py", "full")
    c.init_from = str(root / "dinov2")
    c.data = dict(full.data, path=_image_folder(root / "images"), num_val=4, image_size=56, num_workers=2)
    c.quiet = True
    pipeline.run(c, str(root / "run"))
    best = root / "run" / "checkpoints" / "best"
    return root, str(best / sorted(os.listdir(best))[-1])


def test_the_workdir_records_the_model_and_normalization_the_run_trained_with(dinov2_run):
    root, _ = dinov2_run
    rec = json.loads((root / "run" / "resolved.json").read_text())
    s = rec["student"]
    assert (s["width"], s["depth"], s["num_heads"], s["patch_size"], s["act"], s["ln_eps"]) == (
        32, 2, 2, [14, 14], "gelu_exact", 1e-6)
    assert (s["num_registers"], s["class_token"], s["pool_type"], s["layerscale_init"] is not None) == (
        2, True, "none", True)
    assert rec["teacher"]["pool_type"] == "tok" and rec["teacher"]["act"] == "gelu_exact"
    assert rec["data"] == {"image_size": 56, "normalization": "imagenet", "normalization_source": str(
        root / "dinov2" / "preprocessor_config.json") + " image_mean/image_std"}
    assert rec["init_from"]["format"] == "hf"
    saved = json.loads((root / "run" / "config.json").read_text())
    assert saved["data"]["normalization"] == "imagenet"  # the config saved holds the name the run used


def test_export_needs_no_flag_and_loads_strictly_in_transformers(dinov2_run, torch, transformers, tmp_path,
                                                                 capsys):
    root, ckpt = dinov2_run
    assert export.main(["--input", ckpt, "--output", str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf_model, info = transformers.Dinov2WithRegistersModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf_model.config.hidden_act == "gelu" and hf_model.config.layer_norm_eps == 1e-6  # exact GELU
    model, params = load.load_any(ckpt, quiet=True)
    assert model.act == "gelu_exact" and model.num_registers == 2
    x = images(image=(56, 56))
    ours = np.asarray(model.apply({"params": params}, x)[1]["encoded"])
    hf_model.eval()
    with torch.no_grad():
        theirs = hf_model(pixel_values=nchw(torch, x)).last_hidden_state.numpy()
    assert maxdiff(ours, theirs) <= TOL


@pytest.mark.parametrize("flags,message", [
    (["--variant", "S/14"], "width=384 (from variant 'S/14') where it records width=32"),
    (["--model", '{"act": "gelu"}'], "act='gelu' where it records act='gelu_exact'"),
])
def test_a_flag_that_contradicts_the_record_is_refused_in_one_line(dinov2_run, tmp_path, capsys, flags, message):
    _, ckpt = dinov2_run
    assert export.cli(["--input", ckpt, "--output", str(tmp_path / "x"), "--to", "hf", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "resolved.json records the model" in err[0]
    assert not os.path.exists(tmp_path / "x")
    # agreeing flags are fine
    assert export.main(["--input", ckpt, "--output", str(tmp_path / "y"), "--to", "orbax", "--model",
                        '{"act": "gelu_exact", "num_registers": 2}']) == 0
    assert json.loads((tmp_path / "y.model.json").read_text())["normalization"] == "imagenet"


def test_the_probe_reads_the_record(dinov2_run):
    from lalign.probe.features import load_backbone, normalization_for

    root, ckpt = dinov2_run
    model, _, path, fmt = load_backbone(str(root / "run"))
    assert path == ckpt and (model.act, model.num_registers, model.width) == ("gelu_exact", 2, 32)
    assert normalization_for(model, "", path, fmt) == "imagenet"


def test_a_workdir_from_before_the_record_takes_its_model_from_the_teacher_it_names(dinov2_run, tmp_path):
    """A workdir with only config.json (whose model section is the recipe's B/16 the HF teacher overrode): the
    teacher's own config decides, as it did in training."""
    root, ckpt = dinov2_run
    old = tmp_path / "old"
    os.makedirs(old / "checkpoints" / "best")
    (old / "config.json").write_text((root / "run" / "config.json").read_text())
    step = os.path.basename(ckpt)
    os.symlink(ckpt, old / "checkpoints" / "best" / step)
    os.makedirs(old / "checkpoints" / "checksums" / "best")  # the step's checksum record travels with it
    shutil.copy(root / "run" / "checkpoints" / "checksums" / "best" / f"{step}.json",
                old / "checkpoints" / "checksums" / "best" / f"{step}.json")
    model, _ = load.load_any(str(old / "checkpoints" / "best" / step), quiet=True)
    assert (model.act, model.width, model.num_registers, model.pool_type) == ("gelu_exact", 32, 2, "none")


def test_a_resumed_run_must_resolve_to_the_model_its_checkpoints_have(dinov2_run):
    root, _ = dinov2_run
    rec = json.loads((root / "run" / "resolved.json").read_text())
    assert validate.resolved_errors(rec, rec) == []
    changed = json.loads(json.dumps(rec))
    changed["student"]["act"], changed["data"]["normalization"] = "gelu", "siglip"
    changed["student"]["remat_policy"] = "nothing_saveable"  # a compute choice may change
    assert validate.resolved_errors(rec, changed) == [
        'student.act: "gelu_exact" in the workdir\'s checkpoints, "gelu" now',
        'data.normalization: "imagenet" in the workdir\'s checkpoints, "siglip" now']
    with pytest.raises(ValueError, match="holds checkpoints of another model: student.act"):
        validate.check_resolved(changed, str(root / "run"))


def test_the_teacher_block_says_what_the_checkpoint_and_the_config_decide(torch, transformers, tmp_path, capsys):
    """A recipe for SigLIP B/16 with a DINOv2 HF teacher: the checkpoint decides, the ignored fields are named;
    a big_vision npz: the shapes decide the sizes, config.model act/ln_eps, and what neither gives is named."""
    _hf_dir(torch, transformers, tmp_path / "dinov2", "dinov2")
    c = load_config("configs/siglip_b16.py", "full")
    c.init_from, c.data.image_size = str(tmp_path / "dinov2"), 56
    teacher_lib.get_teacher(c, str(tmp_path / "wd"))
    out = capsys.readouterr().out
    assert f"the checkpoint decides ({tmp_path / 'dinov2' / 'config.json'}):" in out and "act='gelu_exact'" in out
    ignored = next(line for line in out.splitlines() if "config.model ignored (the checkpoint decides): " in line)
    assert "width=768 (from variant 'B/16') where it records width=32" in ignored
    assert "pool_type='map' where it records pool_type='tok'" in ignored
    assert "config.model decides (compute choices): " in out and "scan=True" in out

    model = ViT(patch_size=(4, 4), width=16, depth=1, mlp_dim=32, num_heads=2, pool_type="map")
    bigvision.save_npz(str(tmp_path / "m.npz"), jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8, 8, 3)))[
        "params"])
    c = load_config("configs/siglip_b16.py", "smoke")
    c.init_from, c.data.image_size = str(tmp_path / "m.npz"), 8
    c.model = dict(pool_type="map", ln_eps=1e-6, scan=False)
    teacher_lib.get_teacher(c, str(tmp_path / "wd2"))
    out = capsys.readouterr().out
    assert "the parameter shapes decide: " in out and "width=16" in out
    assert "config.model decides: ln_eps=1e-06" in out and "neither records (defaults): " in out and \
           "act='gelu'" in out


def test_an_explicit_normalization_wins_and_auto_follows_the_teacher(torch, transformers, tmp_path, capsys):
    _hf_dir(torch, transformers, tmp_path / "dinov2", "dinov2")
    c = load_config("configs/siglip_b16.py", "full")
    c.init_from = str(tmp_path / "dinov2")
    assert c.data.normalization == ""  # the recipes take the teacher's
    assert pipeline.resolve_normalization(c)["normalization"] == c.data.normalization == "imagenet"
    c.data.normalization = "siglip"
    assert pipeline.resolve_normalization(c) == {"normalization": "siglip", "source": "config.data.normalization"}
    assert "normalization 'siglip' (config.data.normalization); the teacher's would be 'imagenet'" in \
        capsys.readouterr().out
    c = load_config("configs/clip_b16.py", "full")
    c.init_from = "random"  # no checkpoint: config.model's family
    assert pipeline.resolve_normalization(c)["normalization"] == "clip"
    c.data.normalization = "imagnet"
    with pytest.raises(ValueError, match="config.data.normalization must be one of"):
        validate.check(c, str(tmp_path / "w"), 8)
