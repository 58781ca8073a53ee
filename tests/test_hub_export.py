"""Hub-ready exports: HF preprocessor_config.json + model card, timm's hub config.json, open_clip_config.json, each
read by the real library and giving lalign's own preprocessing and features."""
import io
import json

import numpy as np
import pytest

from lalign import export
from lalign.checkpoints import bigvision, hub_files
from lalign.checkpoints.common import flatten, model_fields
from lalign.checkpoints.load import checkpoint_normalization, load_any
from lalign.checkpoints.manager import save_params
from lalign.data.images import NORMALIZATION, decode_and_crop, normalize

from interop import CLIP, SIGLIP, SMALL, TOL, make, maxdiff, nchw

# big_vision's activation (gelu tanh): what a npz, which records none, is read as
DINOV2 = dict(SMALL, mlp_dim=96, pool_type="tok", class_token=True, cls_posemb=True, layerscale_init=1.0)


def _images(size, n=2, seed=3):
    """Square RGB PIL images of another size than the model's (the processor resizes them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _lalign_pixels(pil_images, size, normalization):
    """lalign's evaluation preprocessing (lalign/data/images.py) of the same images."""
    out = []
    for im in pil_images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(decode_and_crop(buf.getvalue(), size, False, np.random.default_rng(0),
                                   {"interpolation": "bicubic", "val_crop_fraction": 1.0}))
    return normalize(np.stack(out), normalization)


def _export(*argv):
    assert export.main([str(a) for a in argv]) == 0


def _hf_features(torch, transformers, out, pil_images):
    model = transformers.AutoModel.from_pretrained(out)
    # PIL's resize, lalign's own (transformers 5 picks the torchvision backend where torchvision is installed)
    processor = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
    model.eval()
    with torch.no_grad():
        o = model(**processor(images=pil_images, return_tensors="pt"))
        tokens = o.last_hidden_state
        if model.config.model_type == "clip_vision_model":  # the aligned features follow the final norm
            tokens = getattr(model, "vision_model", model).post_layernorm(tokens)
    return processor, tokens.numpy()


# ------------------------------------------------------------------------------------------ a trained run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny MaskEmbed run (configs/demo.py:tiny, 2 steps) with a probe summary, as lalign.main leaves it."""
    from conftest import load_config
    from lalign.pretrain import pretrain_teacher
    from lalign.train import train_maskembed

    workdir = tmp_path_factory.mktemp("run")
    config = load_config(arg="tiny")
    config.total_steps, config.eval_every = 2, 2
    model, params = pretrain_teacher(config, str(workdir))
    with open(workdir / "config.json", "w") as f:
        f.write(config.to_json_best_effort())
    train_maskembed(config, str(workdir), model, params)
    with open(workdir / "summary.json", "w") as f:
        json.dump({"probe": {"teacher": {"macro_recall": 0.61, "miou": 0.2},
                             "aligned": {"macro_recall": 0.67, "miou": 0.25}}}, f)
    return workdir, config


def test_hf_export_of_a_training_step_loads_with_its_processor(run, transformers, torch, tmp_path):
    workdir, config = run
    step = workdir / "checkpoints" / "best" / "2"
    out = tmp_path / "hf"
    _export("--input", step, "--output", out, "--to", "hf", "--head-from", workdir / "teacher" / "params")
    pre = json.loads((out / "preprocessor_config.json").read_text())
    size = config.data.image_size
    # the scenes state no normalization: the SigLIP family's [-1, 1]
    assert pre["image_processor_type"] == "SiglipImageProcessor" and pre["size"] == {"height": size, "width": size}
    assert pre["image_mean"] == [0.5] * 3 and pre["image_std"] == [0.5] * 3 and pre["resample"] == 3
    pil = _images(size + 8)
    processor, tokens = _hf_features(torch, transformers, out, pil)
    assert type(processor).__name__.startswith("SiglipImageProcessor")
    model, params = load_any(str(step))
    _, aux = model.apply({"params": params}, _lalign_pixels(pil, size, "siglip"))
    assert maxdiff(tokens, aux["encoded"]) <= TOL
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: other\n") and "library_name: transformers" in card
    for text in ("- locality-alignment", "- maskembed", "arXiv:2410.11087", "@inproceedings{covert2025locality",
                 "| steps | 2 of 2 |", f"| batch size | {config.batch_size} |", "| loss | mse |",
                 "Validation loss (MaskEmbed): best", "| aligned | 0.6700 | 0.2500 |", "not stated by the checkpoint",
                 "AutoModel.from_pretrained", "AutoImageProcessor.from_pretrained", "huggingface_hub.upload_folder",
                 "Base model (teacher): pretrained from scratch by the same run"):
        assert text in card, text


def test_a_workdirs_teacher_params_are_carded_as_a_conversion(run, tmp_path):
    workdir, _ = run
    _export("--input", workdir / "teacher" / "params", "--output", tmp_path / "hf", "--to", "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "converted by lalign" in card and "## Training" not in card and "Locality-aligned" not in card


def test_model_card_names_a_hub_teacher_and_its_license():
    src = hub_files.Source(input="wd/checkpoints/best/9", normalization="siglip", normalization_source="x",
                           stated=True, workdir=None, teacher="google/siglip-base-patch16-224@abc123")
    card = hub_files.model_card(src, "transformers", "SiglipVisionModel", 224, "load()", "last_hidden_state")
    assert "license: apache-2.0\nbase_model: google/siglip-base-patch16-224\n" in card
    assert "[google/siglip-base-patch16-224](https://huggingface.co/google/siglip-base-patch16-224)" in card


# ---------------------------------------------------------------------------------- each family's processor
@pytest.mark.parametrize("family", ["clip", "dinov2", "siglip2"])
def test_hf_processor_of_each_family(family, transformers, torch, tmp_path):
    fields = {"clip": CLIP, "dinov2": DINOV2, "siglip2": SIGLIP}[family]
    model, params = make(fields, seed=2)
    if family == "clip":  # an orbax params dir whose record states the run's normalization (not CLIP's own)
        src, normalization = tmp_path / "params", "imagenet"
        save_params(str(src), params)
        (tmp_path / "params.model.json").write_text(json.dumps(dict(model_fields(model),
                                                                    normalization=normalization)))
    else:  # a big_vision npz states none: the family's
        src, normalization = tmp_path / "in.npz", {"dinov2": "imagenet", "siglip2": "siglip"}[family]
        bigvision.save_npz(src, params)
    out = tmp_path / "hf"
    _export("--input", src, "--output", out, "--to", "hf", *(("--kind", "siglip2") if family == "siglip2" else ()))
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == hub_files.PROCESSORS[family]
    assert (pre["image_mean"], pre["image_std"]) == tuple(list(v) for v in NORMALIZATION[normalization])
    pil = _images(40)
    processor, tokens = _hf_features(torch, transformers, out, pil)
    assert type(processor).__name__.startswith(hub_files.PROCESSORS[family])
    _, aux = model.apply({"params": params}, _lalign_pixels(pil, 32, normalization))
    assert maxdiff(tokens, aux["encoded"]) <= TOL
    assert checkpoint_normalization(str(out))[0] == normalization  # and lalign reads it back


# ------------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("family,arch", [("siglip", "vit_base_patch16_siglip_224"),
                                         ("clip", "vit_base_patch16_clip_quickgelu_224"),
                                         ("dinov2", "vit_base_patch14_dinov2")])
def test_timm_hub_folder_loads_into_the_named_model(family, arch, timm_mod, torch, tmp_path):
    from timm.data import resolve_data_config

    fields = {"siglip": SIGLIP, "clip": CLIP, "dinov2": DINOV2}[family]
    normalization = {"siglip": "siglip", "clip": "clip", "dinov2": "imagenet"}[family]
    model, params = make(fields, seed=4)
    bigvision.save_npz(tmp_path / "in.npz", params)
    out = tmp_path / "timm"
    fields_flag = ("--model", json.dumps({"act": "quick_gelu", "ln_eps": 1e-5})) if family == "clip" else ()
    _export("--input", tmp_path / "in.npz", "--output", out, "--to", "timm", *fields_flag)  # a npz records no act
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == arch and cfg["num_features"] == 48 and cfg["num_classes"] == 0
    assert {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 32, "patch_size": 8}.items() \
        <= cfg["model_args"].items()
    weights = str(out / "model.safetensors")
    t = timm_mod.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=weights),
                              **cfg["model_args"])
    from safetensors.torch import load_file

    sd = load_file(weights)
    assert sorted(t.state_dict()) == sorted(sd)  # every weight of the file, and nothing random
    t.load_state_dict(sd, strict=True)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    t.eval()
    with torch.no_grad():
        f = t.forward_features(nchw(torch, x)).numpy()
    _, aux = model.apply({"params": params}, x)
    assert maxdiff(f, aux["encoded"]) <= TOL
    from timm.models import _factory

    if "local-dir" in getattr(_factory, "_MODEL_SOURCES", ()):  # the folder as timm reads a hub repo (timm 1.0.20+)
        t2 = timm_mod.create_model(f"local-dir:{out}", pretrained=True).eval()
        with torch.no_grad():
            assert maxdiff(t2.forward_features(nchw(torch, x)).numpy(), aux["encoded"]) <= TOL
        assert t2.pretrained_cfg["mean"] == list(NORMALIZATION[normalization][0])
    data = resolve_data_config(pretrained_cfg=cfg["pretrained_cfg"])
    mean, std = NORMALIZATION[normalization]
    assert np.allclose(data["mean"], mean) and np.allclose(data["std"], std)
    assert tuple(data["input_size"]) == (3, 32, 32) and data["interpolation"] == "bicubic" and data["crop_pct"] == 1.0
    assert checkpoint_normalization(weights, "timm")[0] == normalization
    assert "library_name: timm" in (out / "README.md").read_text()


@pytest.mark.parametrize("to", ["timm", "open_clip"])
def test_hub_folders_read_back_exactly(to, tmp_path):
    """A timm / open_clip hub folder is an --input like its weights file: the export chain is exact."""
    fields = SIGLIP if to == "timm" else dict(CLIP, num_classes=16)
    model, params = make(fields, seed=6)
    if to == "open_clip":
        params = dict(params, head=dict(params["head"], bias=np.zeros_like(params["head"]["bias"])))
    bigvision.save_npz(tmp_path / "in.npz", params)
    extra = ("--model", json.dumps({"act": "quick_gelu", "ln_eps": 1e-5})) if to == "open_clip" else ()
    _export("--input", tmp_path / "in.npz", "--output", tmp_path / "folder", "--to", to, *extra)
    _export("--input", tmp_path / "folder", "--output", tmp_path / "out.npz", "--to", "bigvision")
    back = flatten(bigvision.load_npz(tmp_path / "out.npz"))
    assert sorted(back) == sorted(flatten(params))
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(back[k], np.asarray(v), err_msg=k)


def test_timm_safetensors_output_is_one_file_as_before(tmp_path):
    model, params = make(SIGLIP)
    bigvision.save_npz(tmp_path / "in.npz", params)
    (tmp_path / "o").mkdir()
    _export("--input", tmp_path / "in.npz", "--output", tmp_path / "o" / "m.safetensors", "--to", "timm")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["m.safetensors"]


# -------------------------------------------------------------------------------------------- open_clip
def test_open_clip_hub_folder_preprocess_cfg(torch, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    model, params = make(dict(CLIP, num_classes=16), seed=5)
    params = dict(params, head=dict(params["head"], bias=np.zeros_like(params["head"]["bias"])))
    bigvision.save_npz(tmp_path / "in.npz", params)
    out = tmp_path / "oc"
    _export("--input", tmp_path / "in.npz", "--output", out, "--to", "open_clip", "--model",
            json.dumps({"act": "quick_gelu", "ln_eps": 1e-5}))
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["width"] == 48 and cfg["model_cfg"]["quick_gelu"]
    pc = open_clip.transform.PreprocessCfg(**cfg["preprocess_cfg"])  # open_clip's own reader of the fields
    merged = open_clip.transform.merge_preprocess_dict(open_clip.transform.PreprocessCfg(), cfg["preprocess_cfg"])
    mean, std = NORMALIZATION["clip"]
    for p in (pc, open_clip.transform.PreprocessCfg(**merged)):
        assert np.allclose(p.mean, mean) and np.allclose(p.std, std) and p.size == 32
        assert p.interpolation == "bicubic" and p.resize_mode == "shortest"
    weights = out / hub_files.OPEN_CLIP_WEIGHTS
    assert checkpoint_normalization(str(weights), "open_clip")[0] == "clip"
    _, back = load_any(str(weights), "open_clip")  # the weights beside it read back exactly
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(flatten(back)[k]), np.asarray(v), err_msg=k)
