"""Teacher families beyond SigLIP / CLIP: each read from the real library's own (random-weight) model, with parity
of the token features, written back in that library's format, and a round trip.

DINOv2 (timm `vit_*_dinov2`, `vit_*_reg4_dinov2`; transformers `Dinov2Model`, `Dinov2WithRegistersModel`),
open_clip `VisionTransformer`, plain timm ViTs (augreg, DINO, MAE), and clear errors for what lalign cannot hold.
"""
import jax
import numpy as np
import pytest

from lalign.checkpoints import timm as ltimm
from lalign.checkpoints.common import resample_posemb, resize_grid

from interop import TOL, assert_same_tree, images, maxdiff, nchw, randomize_torch, same_model

DINO_SMALL = dict(embed_dim=48, depth=2, num_heads=3)  # a tiny ViT-S/14 shape: 2x2 patches at 28 px


def _features(torch, t, x):
    t.eval()
    with torch.no_grad():
        return t.forward_features(nchw(torch, x)).numpy()


def _encoded(model, params, x):
    return np.asarray(model.apply({"params": params}, x)[1]["encoded"])


def _timm_file(torch, timm_mod, path, name, **kw):
    """A timm model `name` (DINO_SMALL-sized, every weight random) and its state dict saved at `path`."""
    from safetensors.torch import save_file

    t = randomize_torch(torch, timm_mod.create_model(name, pretrained=False, **DINO_SMALL, **kw))
    save_file(t.state_dict(), path)
    return t


# ------------------------------------------------------------------------------------------------- DINOv2
@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_timm_dinov2_imports_with_parity_and_writes_back(name, torch, timm_mod, tmp_path):
    t = _timm_file(torch, timm_mod, tmp_path / "t.safetensors", name, img_size=28)
    model, params = ltimm.from_timm(tmp_path / "t.safetensors", num_heads=3)
    regs = 4 if "reg4" in name else 0
    assert (model.num_registers, model.num_prefix_tokens) == (regs, 1 + regs)
    assert model.layerscale_init is not None and model.act == "gelu_exact" and model.ln_eps == 1e-6
    # timm's DINOv2: the class token has a position row; the reg4 models (no_embed_class) fold it into the token
    assert model.cls_posemb == (regs == 0)
    x = images(image=(28, 28))
    ours = _encoded(model, params, x)
    assert ours.shape == (2, 1 + regs + 4, 48)
    assert maxdiff(ours, _features(torch, t, x)) <= TOL
    # written back: timm loads it strictly into the same architecture, same features
    ltimm.to_timm(params, model, tmp_path / "back.safetensors")
    t2 = ltimm.timm_model(tmp_path / "back.safetensors")
    from safetensors.torch import load_file

    t2.load_state_dict(load_file(tmp_path / "back.safetensors"), strict=True)
    assert maxdiff(_features(torch, t2, x), ours) <= TOL
    m2, p2 = ltimm.from_timm(tmp_path / "back.safetensors")
    same_model(m2, model)
    assert_same_tree(p2, params)


def test_registers_with_a_class_position_row_round_trip_through_timm(torch, timm_mod, tmp_path):
    """A class token with its own row plus registers (HF Dinov2WithRegisters' layout) is timm no_embed_class=False:
    timm then keeps a row per register, written as zeros and folded back on import."""
    from safetensors.torch import load_file

    from interop import make

    model, params = make(dict(patch_size=(14, 14), width=48, depth=2, mlp_dim=192, num_heads=3, pool_type="tok",
                              class_token=True, cls_posemb=True, num_registers=2, layerscale_init=1.0,
                              act="gelu_exact"), image=(28, 28))
    x = images(image=(28, 28))
    ltimm.to_timm(params, model, tmp_path / "m.safetensors")
    sd = load_file(tmp_path / "m.safetensors")
    assert sd["pos_embed"].shape == (1, 1 + 2 + 4, 48) and not sd["pos_embed"][0, 1:3].any()
    t = ltimm.timm_model(tmp_path / "m.safetensors")
    t.load_state_dict(sd, strict=True)
    assert maxdiff(_features(torch, t, x), _encoded(model, params, x)) <= TOL
    m2, p2 = ltimm.from_timm(tmp_path / "m.safetensors")
    same_model(m2, model)
    assert_same_tree(p2, params)


@pytest.mark.parametrize("mode,antialias", [("bicubic", True), ("bicubic", False), ("bilinear", True)])
@pytest.mark.parametrize("old,new", [((37, 37), (16, 16)), ((4, 4), (9, 7))])
def test_position_tables_resize_like_torch(old, new, mode, antialias, torch):
    import torch.nn.functional as F

    t = np.random.default_rng(0).normal(size=(*old, 8)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(t).permute(2, 0, 1)[None], size=new, mode=mode, align_corners=False,
                        antialias=antialias)[0].permute(1, 2, 0).numpy()
    assert maxdiff(resize_grid(t, new, antialias, mode), ref) <= 1e-5


def test_a_dinov2_checkpoint_runs_at_the_training_resolution_like_timm(torch, timm_mod, tmp_path):
    """A 518 px DINOv2 has a 37x37 table; the reference trains at 224 (16x16): timm resizes the table when it
    loads the checkpoint (bicubic, antialias), and so does lalign; the features at the new size agree."""
    from timm.layers import resample_abs_pos_embed

    big = _timm_file(torch, timm_mod, tmp_path / "t.safetensors", "vit_small_patch14_dinov2", img_size=56)
    model, params = ltimm.from_timm(tmp_path / "t.safetensors", num_heads=3)
    small = resample_posemb(params, model, (2, 2))
    sd = dict(big.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=(2, 2), num_prefix_tokens=1)
    t = timm_mod.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, **DINO_SMALL)
    t.load_state_dict(sd, strict=True)
    x = images(image=(28, 28))
    assert maxdiff(_encoded(model, small, x), _features(torch, t, x)) <= TOL
    assert small["pos_embedding"].shape == (1, 5, 48)
    np.testing.assert_array_equal(small["pos_embedding"][:, 0], params["pos_embedding"][:, 0])  # class row kept
    assert jax.tree.map(np.shape, resample_posemb(params, model, (4, 4))) == jax.tree.map(np.shape, params)


def _hf_dinov2(transformers, registers: int, image_size=28):
    kw = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=4, image_size=image_size,
              patch_size=14)
    if registers:
        return transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            num_register_tokens=registers, **kw))
    return transformers.Dinov2Model(transformers.Dinov2Config(**kw))


def _hf_tokens(torch, model, x):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=nchw(torch, x)).last_hidden_state.numpy()


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_imports_with_parity_and_writes_back(registers, torch, transformers, tmp_path):
    """transformers' own (random) DINOv2 -> lalign: same tokens; lalign -> HF: loads strictly, same tokens."""
    from lalign.checkpoints import hf

    t = randomize_torch(torch, _hf_dinov2(transformers, registers))
    t.save_pretrained(tmp_path / "native")
    model, params = hf.from_hf(tmp_path / "native")
    assert (model.num_registers, model.cls_posemb, model.pool_type) == (registers, True, "tok")
    x = images(image=(28, 28))
    ours = _encoded(model, params, x)
    assert ours.shape == (2, 1 + registers + 4, 48)
    assert maxdiff(ours, _hf_tokens(torch, t, x)) <= TOL
    config = hf.to_hf(params, model, tmp_path / "out")
    assert config["architectures"] == ["Dinov2WithRegistersModel" if registers else "Dinov2Model"]
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    t2, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert maxdiff(_hf_tokens(torch, t2, x), ours) <= TOL
    m2, p2 = hf.from_hf(tmp_path / "out")
    same_model(m2, model)
    assert_same_tree(p2, params)


def test_timm_registers_dinov2_exports_to_hf(torch, timm_mod, transformers, tmp_path):
    """timm's reg4 DINOv2 (class position row folded into the token) -> HF Dinov2WithRegistersModel: same tokens."""
    from lalign.checkpoints import hf

    t = _timm_file(torch, timm_mod, tmp_path / "t.safetensors", "vit_small_patch14_reg4_dinov2", img_size=28)
    model, params = ltimm.from_timm(tmp_path / "t.safetensors", num_heads=3)
    hf.to_hf(params, model, tmp_path / "hf")
    h = transformers.Dinov2WithRegistersModel.from_pretrained(tmp_path / "hf")
    x = images(image=(28, 28))
    assert maxdiff(_hf_tokens(torch, h, x), _features(torch, t, x)) <= TOL


@pytest.mark.parametrize("registers,antialias", [(0, False), (4, True)])
def test_hf_dinov2_at_another_resolution_matches_a_resized_table(registers, antialias, torch, transformers,
                                                                   tmp_path):
    """HF interpolates the table at run time (Dinov2Model without antialias, the registers model with it); a
    table resized once by lalign gives the same tokens."""
    from lalign.checkpoints import hf

    t = randomize_torch(torch, _hf_dinov2(transformers, registers, image_size=56))
    t.save_pretrained(tmp_path / "native")
    model, params = hf.from_hf(tmp_path / "native")
    x = images(image=(28, 28))
    small = resample_posemb(params, model, (2, 2), antialias=antialias)
    assert maxdiff(_encoded(model, small, x), _hf_tokens(torch, t, x)) <= TOL


# ------------------------------------------------------------------------------------------------ open_clip
@pytest.fixture(scope="module")
def open_clip_mod(torch):
    return pytest.importorskip("open_clip")


OC_VISION = dict(layers=2, width=48, head_width=16, mlp_ratio=4.0, patch_size=8, image_size=32)


def _oc_run(torch, visual, x):
    visual.eval()
    visual.output_tokens = True
    with torch.no_grad():
        pooled, tokens = visual(nchw(torch, x))
    return pooled.numpy(), tokens.numpy()


@pytest.mark.parametrize("quick_gelu,ls", [(True, None), (False, 0.1)])
def test_open_clip_model_imports_with_parity_and_writes_back(quick_gelu, ls, torch, open_clip_mod, tmp_path):
    """A whole (tiny, random) open_clip CLIP saved as its state dict + open_clip_config.json, as LAION / DFN /
    MetaCLIP models ship: lalign reads the image tower, tokens and projected embedding agree; written back, open_clip
    loads it strictly."""
    import json

    from safetensors.torch import load_file, save_file

    from lalign.checkpoints import open_clip as loc

    vision = dict(OC_VISION, ls_init_value=ls)
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    clip = randomize_torch(torch, open_clip_mod.model.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text,
                                                           quick_gelu=quick_gelu))
    (tmp_path / "hub").mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              tmp_path / "hub" / "open_clip_model.safetensors")
    with open(tmp_path / "hub" / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": {"embed_dim": 24, "quick_gelu": quick_gelu, "vision_cfg": vision,
                                 "text_cfg": text}}, f)
    model, params = loc.from_open_clip(str(tmp_path / "hub" / "open_clip_model.safetensors"))
    assert (model.num_heads, model.act, model.ln_eps, model.num_classes) == (
        3, "quick_gelu" if quick_gelu else "gelu_exact", 1e-5, 24)
    assert (model.layerscale_init is not None) == (ls is not None)
    x = images()
    out, aux = model.apply({"params": params}, x)
    pooled, tokens = _oc_run(torch, clip.visual, x)
    assert maxdiff(aux["encoded"][:, 1:], tokens) <= TOL and maxdiff(out, pooled) <= TOL
    cfg = loc.to_open_clip(params, model, str(tmp_path / "back.safetensors"))
    assert cfg["vision_cfg"]["head_width"] == 16 and cfg["quick_gelu"] == quick_gelu
    visual = loc.open_clip_visual(str(tmp_path / "back.safetensors"))
    sd = {k[len("visual."):]: v for k, v in load_file(tmp_path / "back.safetensors").items()}
    visual.load_state_dict(sd, strict=True)
    p2, t2 = _oc_run(torch, visual, x)
    assert maxdiff(t2, tokens) <= TOL and maxdiff(p2, pooled) <= TOL
    m2, back = loc.from_open_clip(str(tmp_path / "back.safetensors"))
    same_model(m2, model)
    assert_same_tree(back, params)


def test_an_open_clip_student_gets_its_teachers_projection(torch, open_clip_mod, tmp_path):
    from lalign.checkpoints import open_clip as loc

    from interop import make

    teacher, tparams = make(dict(patch_size=(8, 8), width=48, depth=2, mlp_dim=192, num_heads=3, pool_type="tok",
                                 class_token=True, cls_posemb=True, pre_norm=True, patch_bias=False,
                                 act="quick_gelu", ln_eps=1e-5, num_classes=24))
    tparams["head"]["bias"] = np.zeros(24, np.float32)
    student = teacher.clone(pool_type="none", num_classes=None)
    sparams = {k: v for k, v in tparams.items() if k != "head"}
    with pytest.raises(ValueError, match="pass head_params"):
        loc.to_open_clip(sparams, student, str(tmp_path / "s.safetensors"))
    loc.to_open_clip(sparams, student, str(tmp_path / "s.safetensors"), head_params=tparams)
    m2, p2 = loc.from_open_clip(str(tmp_path / "s.safetensors"))
    same_model(m2, student)
    assert_same_tree(p2, sparams)
    m3, p3 = loc.from_open_clip(str(tmp_path / "s.safetensors"), keep_head=True)
    assert m3.num_classes == 24
    assert_same_tree(p3, tparams)
    with pytest.raises(ValueError, match="no register tokens"):
        loc.to_open_clip(sparams, student.clone(num_registers=1), str(tmp_path / "r.safetensors"))


def test_export_cli_reads_open_clip_and_writes_hf_clip(torch, open_clip_mod, tmp_path, capsys):
    """`lalign.export` tells an open_clip file from a timm one by its names; its image tower as HF CLIPVisionModel
    gives open_clip's tokens."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    from lalign import export
    from lalign.checkpoints import load

    visual = randomize_torch(torch, open_clip_mod.model._build_vision_tower(
        24, open_clip_mod.model.CLIPVisionCfg(**OC_VISION), quick_gelu=True))
    path = tmp_path / "oc.safetensors"
    save_file({"visual." + k: v.contiguous() for k, v in visual.state_dict().items()}, path)
    assert load.guess_format(str(path)) == "open_clip"
    args = ["--input", str(path), "--output", str(tmp_path / "hf"), "--to", "hf", "--model", '{"act": "quick_gelu"}']
    assert export.cli(args) == 2  # no open_clip_config.json: 48 wide is no whole number of 64-wide heads
    assert "pass num_heads (--num-heads)" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"classifier 'head' \(24 classes\) is not part of an HF vision tower"):
        assert export.cli(args + ["--num-heads", "3"]) == 0, capsys.readouterr().err
    h = CLIPVisionModel.from_pretrained(tmp_path / "hf").eval()
    x = images()
    with torch.no_grad():
        out = h(pixel_values=nchw(torch, x))
        tokens = getattr(h, "vision_model", h).post_layernorm(out.last_hidden_state).numpy()  # transformers 4 | 5
    _, ref = _oc_run(torch, visual, x)
    assert maxdiff(tokens[:, 1:], ref) <= TOL


# ------------------------------------------------------------------------------- the generic timm path
# The reference's timm teachers beyond SigLIP / CLIP / DINOv2, by the architecture their timm name builds.
PLAIN_TIMM = {
    "vit_base_patch16_224": "supervised augreg IN-21k/1k, MAE (.mae), MoCo v3: class token with a row, exact GELU",
    "vit_small_patch16_224": "DINO (.dino) and augreg ViT-S",
    "deit3_base_patch16_224": "DeiT III: LayerScale, class token without a position row (no_embed_class)",
    "vit_base_patch16_siglip_gap_224": "SigLIP without its MAP head (global average pooling)",
}


@pytest.mark.parametrize("name", sorted(PLAIN_TIMM))
def test_plain_timm_vits_import_with_parity(name, torch, timm_mod, tmp_path):
    t = _timm_file(torch, timm_mod, tmp_path / "t.safetensors", name, img_size=32, patch_size=8, num_classes=0)
    model, params = ltimm.from_timm(tmp_path / "t.safetensors", num_heads=3)
    x = images()
    f = _features(torch, t, x)
    assert maxdiff(_encoded(model, params, x), f) <= TOL, PLAIN_TIMM[name]
    assert f.shape[1] == model.num_prefix_tokens + 16


UNSUPPORTED_TIMM = {
    "eva02_base_patch14_224": "SwiGLU MLP",
    "beit_base_patch16_224": "relative position bias",
    "deit_base_distilled_patch16_224": "distillation token",
    "vit_giant_patch14_dinov2": "packed gated MLP",
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_TIMM))
def test_timm_families_lalign_cannot_hold_are_named(name, torch, timm_mod, tmp_path):
    from safetensors.torch import save_file

    from lalign import export

    patch = 14 if "patch14" in name else 16
    t = timm_mod.create_model(name, pretrained=False, img_size=2 * patch, embed_dim=48, depth=1, num_heads=3)
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match=UNSUPPORTED_TIMM[name]):
        ltimm.from_timm(tmp_path / "t.safetensors", num_heads=3)
    assert export.cli(["--input", str(tmp_path / "t.safetensors"), "--output", str(tmp_path / "o.npz"),
                       "--to", "bigvision"]) == 2


# ------------------------------------------------------------------------------------------------ SigLIP 2
def _siglip2_run(torch, model, x, patch):
    """Siglip2VisionModel on square images: patchified as its image processor does, no padding patches."""
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    pixels = torch.stack([convert_image_to_patches(im, patch) for im in nchw(torch, x)])
    grid = x.shape[1] // patch
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=pixels, pixel_attention_mask=torch.ones(pixels.shape[:2], dtype=torch.int32),
                    spatial_shapes=torch.tensor([[grid, grid]] * len(x)))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _saved_siglip2(torch, transformers, directory):
    """A random 2-layer Siglip2VisionModel (16 patches of 8 px in its table), saved with save_pretrained."""
    config = transformers.Siglip2VisionConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                              num_attention_heads=3, num_patches=16, patch_size=8)
    t = randomize_torch(torch, transformers.Siglip2VisionModel(config))
    t.save_pretrained(directory)
    return t


def test_siglip2_naflex_tower_imports_with_parity_and_writes_back(torch, transformers, tmp_path):
    """Siglip2VisionModel (Linear patch embedding over flattened patches, a table HF resizes per image) at a fixed
    square resolution: tokens and MAP-pooled output agree both ways, and HF loads what lalign writes strictly."""
    from lalign.checkpoints import hf

    t = _saved_siglip2(torch, transformers, tmp_path / "native")
    model, params = hf.from_hf(tmp_path / "native")
    assert (model.pool_type, model.has_class_token, params["embedding"]["kernel"].shape) == ("map", False,
                                                                                             (8, 8, 3, 48))
    x = images()
    out, aux = model.apply({"params": params}, x)
    tokens, pooled = _siglip2_run(torch, t, x, 8)
    assert maxdiff(aux["encoded"], tokens) <= TOL and maxdiff(out, pooled) <= TOL
    hf.to_hf(params, model, tmp_path / "out", kind="siglip2")
    t2, info = transformers.Siglip2VisionModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens2, pooled2 = _siglip2_run(torch, t2, x, 8)
    assert maxdiff(tokens2, tokens) <= TOL and maxdiff(pooled2, pooled) <= TOL
    m2, p2 = hf.from_hf(tmp_path / "out")
    same_model(m2, model)
    assert_same_tree(p2, params)


def test_siglip2_at_another_resolution_matches_a_bilinear_resized_table(torch, transformers, tmp_path):
    from lalign.checkpoints import hf
    from lalign.checkpoints.load import fit_posemb

    t = _saved_siglip2(torch, transformers, tmp_path / "native")
    model, params = hf.from_hf(tmp_path / "native")  # a 4x4 table, run on 6x6 and 3x3 patches
    for size in (48, 24):
        x = images(image=(size, size))
        resized = fit_posemb(model, params, size, "bilinear_antialias")
        tokens, pooled = _siglip2_run(torch, t, x, 8)
        out, aux = model.apply({"params": resized}, x)
        assert maxdiff(aux["encoded"], tokens) <= TOL and maxdiff(out, pooled) <= TOL
