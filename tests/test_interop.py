"""Interop: big_vision npz, Hugging Face (SigLIP, CLIP) and timm, against the real libraries.

Tiny random models with non-square shapes (width 48, 3 heads of 16, MLP 80) and EVERY parameter randomized
(biases, LayerNorm scales, class token, probe, position embedding), so a missing transpose or a swapped q/k/v
shows up; activations and LayerNorm epsilons (too small an effect to show in outputs) are checked in the written
configs. Parity: every token and the pooled output within 1e-4 (float32). Round trips: exact.

The timm tests need `import timm`, which (timm 1.0.x) imports torchvision at module level; they skip without it.
"""
import json
import os
import warnings

import jax
import ml_dtypes
import numpy as np
import pytest

from lalign.checkpoints import bigvision, hf
from lalign.checkpoints import timm as ltimm
from lalign.checkpoints.common import flatten, model_fields

from interop import (CLIP, IMG, SIGLIP, SMALL, TOL, assert_same_tree, images, is_norm_weight, make,  # noqa: F401
                     maxdiff, nchw, randomize, same_model)


@pytest.fixture(scope="module")
def siglip():
    model, params = make(SIGLIP, seed=0)
    x = images()
    out, aux = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    return model, params, x, np.asarray(out), jax.tree.map(np.asarray, aux)


@pytest.fixture(scope="module")
def clip():
    model, params = make(CLIP, seed=1)
    x = images()
    out, aux = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    return model, params, x, np.asarray(out), jax.tree.map(np.asarray, aux)


@pytest.fixture(scope="module")
def torch_mods():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    return torch, transformers


# ---------------------------------------------------------------------------------------- conversion tables
def test_every_conversion_kind_is_exactly_invertible():
    from lalign.checkpoints import mapping

    rng = np.random.default_rng(0)
    shapes = {"copy": (3, 4), "linear": (6, 5), "conv": (2, 3, 3, 8), "heads_in": (8, 2, 4), "heads_out": (2, 4, 8),
              "patch_linear": (2, 2, 3, 8),
              "flatten": (1, 1, 8), "unbatch": (1, 5, 8)}
    assert set(shapes) == set(mapping.KINDS)
    for kind, shape in shapes.items():
        a = rng.normal(size=shape).astype(np.float32)
        to, back = mapping.KINDS[kind]
        np.testing.assert_array_equal(back(to(a), shape), a, err_msg=kind)
    # torch layouts, spelled out: Linear (out, in); Conv2d (D, 3, ph, pw); q/k/v (H*hd, D); out (D, H*hd)
    assert mapping.KINDS["linear"][0](np.zeros((6, 5))).shape == (5, 6)
    assert mapping.KINDS["conv"][0](np.zeros((2, 3, 3, 8))).shape == (8, 3, 2, 3)
    assert mapping.KINDS["heads_in"][0](np.zeros((8, 2, 4))).shape == (8, 8)
    assert mapping.KINDS["heads_out"][0](np.zeros((2, 4, 8))).shape == (8, 8)


def test_a_table_uses_every_parameter_and_every_tensor():
    from lalign.checkpoints import mapping

    rules = [mapping.Rule("a/kernel", "fc.weight", "linear"),
             mapping.Rule(("q/kernel", "k/kernel"), "blocks.{i}.qk.weight", "heads_in")]
    params = {"a/kernel": np.ones((2, 3)), "q/kernel": np.ones((4, 2, 2)), "k/kernel": np.zeros((4, 2, 2))}
    sd = mapping.export(params, rules[:1] + [mapping.Rule(("q/kernel", "k/kernel"), "qk.weight", "heads_in")], 1,
                        "fmt")
    assert sd["qk.weight"].shape == (8, 4) and sd["fc.weight"].shape == (3, 2)
    back = mapping.import_params(sd, rules[:1] + [mapping.Rule(("q/kernel", "k/kernel"), "qk.weight", "heads_in")],
                                 params, 1, "file")
    assert all(np.array_equal(back[k], params[k]) for k in params)
    with pytest.raises(ValueError, match=r"fmt has no place for the parameter\(s\) \['extra'\]"):
        mapping.export(dict(params, extra=np.ones(2)), rules, 1, "fmt")
    with pytest.raises(ValueError, match=r"file: unexpected keys for the model: \['stray'\]"):
        mapping.import_params(dict(sd, stray=np.ones(1)), rules[:1] + [
            mapping.Rule(("q/kernel", "k/kernel"), "qk.weight", "heads_in")], params, 1, "file")
    with pytest.raises(ValueError, match="file: missing weight 'blocks.0.qk.weight'"):
        mapping.import_params(sd, rules, params, 1, "file")
    with pytest.raises(ValueError, match=r"holds \['q/kernel', 'k/kernel'\], but the model has only \['q/kernel'\]"):
        mapping.import_params(sd, rules, {"a/kernel": np.ones((2, 3)), "q/kernel": np.ones((4, 2, 2))}, 1, "file")
    with pytest.raises(ValueError, match=r"file: this format has no tensor for \['b'\]"):
        mapping.import_params(sd, rules[:1] + [mapping.Rule(("q/kernel", "k/kernel"), "qk.weight", "heads_in")],
                              dict(params, b=np.ones(3)), 1, "file")
    assert [r.theirs for r in mapping.expand(rules, 2)] == ["fc.weight", "blocks.0.qk.weight", "blocks.1.qk.weight"]


# ------------------------------------------------------------------------------------------- big_vision npz
def test_layout_helpers_are_inverse(siglip):
    _, params, *_ = siglip
    scanned = bigvision.blocks_to_scan(params)
    assert set(scanned["Transformer"]) == {"encoderblock", "encoder_norm"}
    assert scanned["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"].shape == (2, 48, 80)
    assert_same_tree(bigvision.scan_to_blocks(scanned), jax.tree.map(np.asarray, params))
    assert_same_tree(bigvision.blocks_to_scan(scanned), scanned)  # already scanned: unchanged


def test_npz_round_trip_and_both_layouts_load_identically(siglip, tmp_path):
    model, params, x, out, _ = siglip
    blocks, scanned = tmp_path / "blocks.npz", tmp_path / "scanned.npz"
    bigvision.save_npz(blocks, params)
    bigvision.save_npz(scanned, params, scan=True)
    with np.load(scanned) as f:  # really the two big_vision layouts on disk
        assert "Transformer/encoderblock/LayerNorm_0/scale" in f.files
    with np.load(blocks) as f:
        assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel" in f.files
    ref = jax.tree.map(np.asarray, params)
    assert_same_tree(bigvision.load_npz(blocks), ref)
    assert_same_tree(bigvision.load_npz(scanned, like=params), ref)  # converted to like's layout
    assert_same_tree(bigvision.load_npz(blocks, scan=True), bigvision.load_npz(scanned))
    # The scanned checkpoint runs in a scanned model and gives the same function.
    out_s, _ = model.clone(scan=True).apply({"params": bigvision.load_npz(scanned)}, x)
    assert maxdiff(out_s, out) < 1e-5


def test_npz_two_tower_bfloat16(siglip, tmp_path):
    """A SigLIP release file: `params/img/...` and `params/txt/...`, bfloat16 stored as void V2."""
    _, params, *_ = siglip
    flat = {f"params/img/{k}": np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in flatten(params).items()}
    flat.update({"params/txt/Embed_0/embedding": np.ones((10, 48), ml_dtypes.bfloat16),
                 "params/t": np.array([2.3], np.float32), "params/b": np.array([-10.0], np.float32)})
    path = tmp_path / "siglip.npz"
    np.savez(path, **flat)
    with np.load(path) as f:
        assert f["params/img/embedding/kernel"].dtype == np.dtype("V2")
    loaded = bigvision.load_npz(path)
    assert loaded["embedding"]["kernel"].dtype == ml_dtypes.bfloat16
    assert_same_tree(loaded, jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), params))
    assert bigvision.load_npz(path, dtype=np.float32)["pos_embedding"].dtype == np.float32
    # Our own save of bfloat16 leaves round-trips too.
    bigvision.save_npz(tmp_path / "bf16.npz", loaded)
    assert_same_tree(bigvision.load_npz(tmp_path / "bf16.npz"), loaded)


def test_npz_errors_name_file_key_and_shapes(siglip, tmp_path):
    _, params, *_ = siglip
    path = tmp_path / "m.npz"
    bigvision.save_npz(path, params)
    _, other = make(dict(SIGLIP, mlp_dim=96))
    with pytest.raises(ValueError) as e:
        bigvision.load_npz(path, like=other)
    msg = str(e.value)
    assert str(path) in msg and "MlpBlock_0/Dense_0/kernel" in msg and "(48, 96)" in msg and "(48, 80)" in msg
    _, deeper = make(dict(SIGLIP, depth=3))
    with pytest.raises(ValueError, match="missing.*encoderblock_2"):
        bigvision.load_npz(path, like=deeper)
    np.savez(tmp_path / "junk.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a big_vision ViT checkpoint"):
        bigvision.load_npz(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        bigvision.load_npz(tmp_path / "nope.npz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    os.replace(tmp_path / "obj.npy", tmp_path / "obj.npz")
    with pytest.raises(ValueError):
        bigvision.load_npz(tmp_path / "obj.npz")


def test_infer_model_from_params(siglip, clip):
    for m, p in (siglip[:2], clip[:2]):
        got = bigvision.infer_model(p, act=m.act, ln_eps=m.ln_eps, pool_type=m.pool_type)
        same_model(got, m)
    with pytest.raises(ValueError, match="width=64 contradicts"):
        bigvision.infer_model(siglip[1], width=64)


# ----------------------------------------------------------------------------------------- Hugging Face
def _hf_run(torch, t, x):
    t.eval()
    with torch.no_grad():
        return t(pixel_values=nchw(torch, x))


def _load_strict(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def test_hf_siglip_parity_and_round_trip(siglip, torch_mods, tmp_path):
    torch, transformers = torch_mods
    model, params, x, out, aux = siglip
    cfg = hf.to_hf(params, model, tmp_path, kind="siglip")
    assert cfg["hidden_act"] == "gelu_pytorch_tanh" and cfg["layer_norm_eps"] == 1e-6 and cfg["vision_use_head"]
    o = _hf_run(torch, _load_strict(transformers.SiglipVisionModel, tmp_path), x)
    assert o.last_hidden_state.shape == (2, 16, 48)
    assert maxdiff(o.last_hidden_state, aux["encoded"]) <= TOL  # SigLIP: after the final norm
    assert maxdiff(o.pooler_output, out) <= TOL  # MAP head
    m2, p2 = hf.from_hf(tmp_path)
    same_model(m2, model)
    assert_same_tree(p2, jax.tree.map(np.asarray, params))
    _, p3 = hf.from_hf(tmp_path, scan=True)
    assert_same_tree(p3, bigvision.blocks_to_scan(jax.tree.map(np.asarray, params)))


def test_hf_clip_parity_and_round_trip(clip, torch_mods, tmp_path):
    torch, transformers = torch_mods
    model, params, x, out, aux = clip
    cfg = hf.to_hf(params, model, tmp_path)  # kind guessed: class token + pre-norm -> clip
    assert cfg["model_type"] == "clip_vision_model" and cfg["hidden_act"] == "quick_gelu"
    assert cfg["layer_norm_eps"] == 1e-5 and cfg["image_size"] == IMG and cfg["patch_size"] == 8
    t = _load_strict(transformers.CLIPVisionModel, tmp_path)
    o = _hf_run(torch, t, x)
    assert o.last_hidden_state.shape == (2, 17, 48)
    assert maxdiff(o.last_hidden_state, aux["pre_ln"]) <= TOL  # HF CLIP: BEFORE the final norm
    post_ln = getattr(t, "vision_model", t).post_layernorm
    with torch.no_grad():
        assert maxdiff(post_ln(o.last_hidden_state), aux["encoded"]) <= TOL  # the aligned feature
    assert maxdiff(o.pooler_output, out) <= TOL  # post_layernorm(CLS) == our 'tok' pooling
    m2, p2 = hf.from_hf(tmp_path)
    same_model(m2, model)
    assert_same_tree(p2, jax.tree.map(np.asarray, params))


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_hf_native_checkpoint_imports_with_parity(kind, torch_mods, tmp_path):
    """A transformers-made model (every weight randomized), saved by save_pretrained, read by from_hf."""
    torch, transformers = torch_mods
    kw = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3, image_size=IMG,
              patch_size=8)
    if kind == "siglip":
        t = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kw))
    else:
        t = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, v in t.state_dict().items():
            if v.is_floating_point():
                r = 0.2 * torch.randn(v.shape, generator=gen)
                v.copy_(1 + r if is_norm_weight(name) else r)
    t.save_pretrained(tmp_path)
    model, params = hf.from_hf(tmp_path)
    x = images()
    o = _hf_run(torch, t, x)
    out, aux = model.apply({"params": params}, x)
    if kind == "siglip":
        assert maxdiff(o.last_hidden_state, aux["encoded"]) <= TOL
    else:
        assert maxdiff(o.last_hidden_state, aux["pre_ln"]) <= TOL
    assert maxdiff(o.pooler_output, out) <= TOL


def test_hf_student_head_options(siglip, torch_mods, tmp_path):
    """An aligned student (pool_type 'none', no MAP head) loads strictly in all three modes."""
    torch, transformers = torch_mods
    teacher, tparams, x, _, _ = siglip
    student = teacher.clone(pool_type="none")
    sparams = {k: v for k, v in randomize(tparams, seed=5).items() if k != "MAPHead_0"}
    _, saux = student.apply({"params": sparams}, x)
    # (1) the teacher's head: HF pooled == teacher head applied to the student's tokens.
    hf.to_hf(sparams, student, tmp_path / "given", head_params=tparams)
    o = _hf_run(torch, _load_strict(transformers.SiglipVisionModel, tmp_path / "given"), x)
    ref, _ = teacher.apply({"params": dict(sparams, MAPHead_0=tparams["MAPHead_0"])}, x)
    assert maxdiff(o.last_hidden_state, saux["encoded"]) <= TOL and maxdiff(o.pooler_output, ref) <= TOL
    m2, p2 = hf.from_hf(tmp_path / "given")  # the added head is dropped again
    same_model(m2, student)
    assert_same_tree(p2, jax.tree.map(np.asarray, sparams))
    assert hf.from_hf(tmp_path / "given", keep_head=True)[0].pool_type == "map"
    # (2) no head given: a random one, with a warning.
    with pytest.warns(UserWarning, match="RANDOMLY initialized head"):
        hf.to_hf(sparams, student, tmp_path / "random")
    o = _hf_run(torch, _load_strict(transformers.SiglipVisionModel, tmp_path / "random"), x)
    assert maxdiff(o.last_hidden_state, saux["encoded"]) <= TOL
    assert_same_tree(hf.from_hf(tmp_path / "random")[1], jax.tree.map(np.asarray, sparams))
    # (3) drop_head: vision_use_head=false.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.to_hf(sparams, student, tmp_path / "nohead", drop_head=True)
    o = _hf_run(torch, _load_strict(transformers.SiglipVisionModel, tmp_path / "nohead"), x)
    assert o.pooler_output is None and maxdiff(o.last_hidden_state, saux["encoded"]) <= TOL
    assert_same_tree(hf.from_hf(tmp_path / "nohead")[1], jax.tree.map(np.asarray, sparams))


def test_hf_rejects_what_it_cannot_express(siglip, clip, tmp_path):
    with pytest.raises(ValueError, match="CLIP needs a class token"):
        hf.to_hf(siglip[1], siglip[0], tmp_path, kind="clip")
    with pytest.raises(ValueError, match="SigLIP has no class token"):
        hf.to_hf(clip[1], clip[0], tmp_path, kind="siglip")
    no_pre = clip[0].clone(pre_norm=False)
    p = {k: v for k, v in clip[1].items() if k != "pre_norm"}
    with pytest.raises(ValueError, match="CLIP has a pre-LayerNorm"):
        hf.to_hf(p, no_pre, tmp_path, kind="clip")
    with pytest.raises(ValueError, match="soft-cap"):
        hf.to_hf(siglip[1], siglip[0].clone(attn_softcap=30.0), tmp_path)
    with pytest.raises(ValueError, match="shape mismatch"):  # params of another model
        hf.to_hf(make(dict(SIGLIP, mlp_dim=96))[1], siglip[0], tmp_path)
    assert not os.path.exists(tmp_path / "model.safetensors")  # nothing half-written


def test_hf_two_tower_directory_reads_the_vision_tower(siglip, tmp_path):
    """A SiglipModel directory (text tower + logit scale/bias next to `vision_model.*`): the vision tower."""
    from safetensors.numpy import load_file, save_file

    model, params, *_ = siglip
    cfg = hf.to_hf(params, model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd.update({"text_model.embeddings.token_embedding.weight": np.ones((10, 48), np.float32),
               "logit_scale": np.ones((1,), np.float32), "logit_bias": np.zeros((1,), np.float32)})
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "siglip", "vision_config": {k: v for k, v in cfg.items() if k != "lalign"},
                   "text_config": {"hidden_size": 48}}, f)
    m2, p2 = hf.from_hf(tmp_path)
    same_model(m2, model)
    assert_same_tree(p2, jax.tree.map(np.asarray, params))


def test_hf_import_errors(siglip, tmp_path):
    from safetensors.numpy import load_file, save_file

    hf.to_hf(siglip[1], siglip[0], tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((81, 48), np.float32)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"MlpBlock_0/Dense_0/kernel.*expected \(48, 80\), got \(48, 81\)"):
        hf.from_hf(tmp_path)
    sd.pop("vision_model.encoder.layers.0.mlp.fc1.weight")
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weight 'vision_model.encoder.layers.0.mlp.fc1.weight'"):
        hf.from_hf(tmp_path)


# ------------------------------------------------------------------------------------------------- timm
def test_timm_round_trip_exact(siglip, clip, tmp_path):
    """ours -> timm safetensors -> ours, exact (needs neither torch nor timm)."""
    for name, (model, params, *_) in {"siglip": siglip, "clip": clip}.items():
        path = tmp_path / f"{name}.safetensors"
        ltimm.to_timm(params, model, path)
        m2, p2 = ltimm.from_timm(path)
        same_model(m2, model)
        assert_same_tree(p2, jax.tree.map(np.asarray, params))
    from safetensors.numpy import load_file

    keys = set(load_file(tmp_path / "siglip.safetensors"))
    assert {"attn_pool.latent", "attn_pool.kv.weight", "blocks.1.attn.qkv.weight", "norm.weight"} <= keys
    assert {"cls_token", "norm_pre.weight", "pos_embed"} <= set(load_file(tmp_path / "clip.safetensors"))
    # Without metadata the heads must be given.
    sd = load_file(tmp_path / "siglip.safetensors")
    with pytest.raises(ValueError, match="num_heads"):
        ltimm.model_from_timm_state_dict(sd)
    m3 = ltimm.model_from_timm_state_dict(sd, num_heads=3, act="gelu")
    same_model(m3, siglip[0])
    with pytest.raises(ValueError, match="unexpected keys.*attn_pool"):
        ltimm.from_timm_state_dict(sd, siglip[0].clone(pool_type="none"))
    # An aligned student: no head (global_pool ''), or the teacher's head as attn_pool (dropped again on import).
    teacher, tparams = siglip[:2]
    student, sparams = teacher.clone(pool_type="none"), {k: v for k, v in tparams.items() if k != "MAPHead_0"}
    assert ltimm.to_timm(sparams, student, tmp_path / "s.safetensors")["global_pool"] == ""
    assert not any(k.startswith("attn_pool") for k in load_file(tmp_path / "s.safetensors"))
    assert ltimm.to_timm(sparams, student, tmp_path / "sh.safetensors", head_params=tparams)["global_pool"] == "map"
    for path in ("s.safetensors", "sh.safetensors"):
        m2, p2 = ltimm.from_timm(tmp_path / path)
        same_model(m2, student)
        assert_same_tree(p2, jax.tree.map(np.asarray, sparams))
    m3, p3 = ltimm.from_timm(tmp_path / "sh.safetensors", keep_head=True)
    assert m3.pool_type == "map"
    assert_same_tree(p3, jax.tree.map(np.asarray, tparams))


@pytest.fixture(scope="module")
def timm_mod(torch_mods):
    return pytest.importorskip("timm")


def _timm_run(torch, t, x):
    t.eval()
    with torch.no_grad():
        f = t.forward_features(nchw(torch, x))
        return f, t.forward_head(f)


def _create(name, kwargs):
    """`timm.create_model(name)` with the architecture overridden by our kwargs (not the eps: the named config's),
    through `timm_model` (which fits the kwargs to the installed timm)."""
    return ltimm.timm_model({k: v for k, v in kwargs.items() if k != "norm_eps"}, name=name)


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_timm_parity_with_named_models(name, siglip, clip, torch_mods, timm_mod, tmp_path):
    torch, _ = torch_mods
    from safetensors.torch import load_file

    model, params, x, out, aux = {"siglip": siglip, "clip": clip}[name]
    path = tmp_path / "m.safetensors"
    kwargs = ltimm.to_timm(params, model, path)
    # The stock configs, overriding only sizes (and for SigLIP the GELU: timm's stock one is exact erf).
    t = _create({"siglip": "vit_base_patch16_siglip_224", "clip": "vit_base_patch16_clip_quickgelu_224"}[name], kwargs)
    assert t.norm.eps == model.ln_eps
    t.load_state_dict(load_file(path), strict=True)
    f, pooled = _timm_run(torch, t, x)
    assert maxdiff(f, aux["encoded"]) <= TOL and maxdiff(pooled, out) <= TOL


def test_timm_parity_big_vision_class_token_non_square(torch_mods, timm_mod, tmp_path):
    """big_vision class token (no position row: timm no_embed_class), non-square patches and grid, classifier."""
    torch, _ = torch_mods
    from safetensors.torch import load_file

    model, params = make(dict(SMALL, patch_size=(8, 4), pool_type="gap", class_token=True, num_classes=5,
                              act="gelu_exact"), image=(16, 40))
    x = images(image=(16, 40))
    out, aux = model.apply({"params": params}, x)
    path = tmp_path / "m.safetensors"
    ltimm.to_timm(params, model, path, image_size=(16, 40))
    t = ltimm.timm_model(path)
    t.load_state_dict(load_file(path), strict=True)
    f, logits = _timm_run(torch, t, x)
    assert f.shape == (2, 21, 48)
    assert maxdiff(f, aux["encoded"]) <= TOL and maxdiff(logits, out) <= TOL
    m2, p2 = ltimm.from_timm(path)
    same_model(m2, model)
    assert_same_tree(p2, jax.tree.map(np.asarray, params))


def test_timm_native_state_dict_imports_with_parity(torch_mods, timm_mod, tmp_path):
    """A timm-made SigLIP-style model (every weight randomized), its plain state dict read by from_timm."""
    torch, _ = torch_mods
    from safetensors.torch import save_file

    t = timm_mod.create_model("vit_base_patch16_siglip_224", pretrained=False, embed_dim=48, depth=2, num_heads=3,
                              mlp_ratio=80 / 48, img_size=IMG, patch_size=8, num_classes=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, v in t.state_dict().items():
            r = 0.2 * torch.randn(v.shape, generator=gen)
            v.copy_(1 + r if is_norm_weight(name) else r)
    save_file(t.state_dict(), tmp_path / "t.safetensors")
    model, params = ltimm.from_timm(tmp_path / "t.safetensors", num_heads=3)  # stock timm: exact GELU
    assert model.act == "gelu_exact" and model.pool_type == "map"
    x = images()
    f, pooled = _timm_run(torch, t, x)
    out, aux = model.apply({"params": params}, x)
    assert maxdiff(f, aux["encoded"]) <= TOL and maxdiff(pooled, out) <= TOL


# --------------------------------------------------------------------------------------------------- CLI
def test_export_cli_chain_is_exact(siglip, tmp_path, capsys):
    """npz -> hf -> timm -> bigvision (scanned) -> orbax -> npz: same params and model at every step."""
    from lalign import export

    model, params, *_ = siglip
    ref = jax.tree.map(np.asarray, params)
    bigvision.save_npz(tmp_path / "in.npz", params)

    def run(*argv):
        assert export.main([str(a) for a in argv]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    run("--input", tmp_path / "in.npz", "--output", tmp_path / "hf", "--to", "hf")
    assert_same_tree(hf.from_hf(tmp_path / "hf")[1], ref)
    run("--input", tmp_path / "hf", "--output", tmp_path / "t.safetensors", "--to", "timm")
    assert_same_tree(ltimm.from_timm(tmp_path / "t.safetensors")[1], ref)
    run("--input", tmp_path / "t.safetensors", "--output", tmp_path / "s.npz", "--to", "bigvision", "--scan")
    assert_same_tree(bigvision.load_npz(tmp_path / "s.npz"), bigvision.blocks_to_scan(ref))
    run("--input", tmp_path / "s.npz", "--output", tmp_path / "orbax", "--to", "orbax", "--no-scan")
    res = run("--input", tmp_path / "orbax", "--output", tmp_path / "out.npz", "--to", "bigvision")
    assert res["model"] == model_fields(model)
    assert_same_tree(bigvision.load_npz(tmp_path / "out.npz"), ref)


def test_export_cli_student_from_workdir(siglip, tmp_path, capsys):
    """An orbax student + the workdir's config.json (as lalign.main writes them) -> HF with the teacher's head."""
    from lalign import export
    from lalign.checkpoints.manager import save_params

    teacher, tparams, x, _, _ = siglip
    sparams = {k: v for k, v in tparams.items() if k != "MAPHead_0"}
    workdir = tmp_path / "wd"
    save_params(str(workdir / "student"), sparams)
    save_params(str(workdir / "teacher" / "params"), tparams)
    with open(workdir / "config.json", "w") as f:
        json.dump({"model": dict(variant=None, width=48, depth=2, mlp_dim=80, num_heads=3, patch_size=8,
                                 pool_type="map", posemb="learn"), "maskembed": {"attn_softcap": None}}, f)
    assert export.main(["--input", str(workdir / "student"), "--output", str(tmp_path / "hf"), "--to", "hf",
                        "--head-from", str(workdir / "teacher" / "params")]) == 0
    assert "model fields from" in capsys.readouterr().err
    with open(tmp_path / "hf" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["lalign"]["head"] == "given" and cfg["lalign"]["pool_type"] == "none"
    m2, p2 = hf.from_hf(tmp_path / "hf")
    assert m2.pool_type == "none"
    assert_same_tree(p2, jax.tree.map(np.asarray, sparams))


def test_export_help_and_errors(tmp_path, capsys):
    from lalign import export

    with pytest.raises(SystemExit) as e:
        export.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("orbax", "bigvision", "hf", "timm", "--head-from", "last_hidden_state"):
        assert word in text
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        export.main(["--input", str(tmp_path / "missing.npz"), "--output", str(tmp_path / "o"), "--to", "hf"])
    with pytest.raises(ValueError, match="--model is not valid JSON"):
        export.main(["--input", "x.npz", "--output", "o", "--to", "hf", "--model", "{act"])
