"""--to paligemma / --to llava: an aligned student placed into the vision tower of a VLM checkpoint, against the real
transformers classes on tiny random VLMs (a tiny Gemma / Llama, a SigLIP / CLIP tower of the student's shape).

After the swap the VLM's tower gives the student's tokens (1e-4, float32), every other tensor is bit-identical,
every other file is copied as it is, and generate runs; a tower the student does not fit is one clear line.
"""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from lalign import export
from lalign.checkpoints import bigvision, hf, vlm
from lalign.checkpoints.common import flatten, load_safetensors

from interop import IMG, SMALL, TOL, images, make, maxdiff, nchw

STUDENT = dict(SMALL, pool_type="none")  # an aligned student: no pooling head
CLIP_STUDENT = dict(STUDENT, class_token=True, cls_posemb=True, pre_norm=True, patch_bias=False, act="quick_gelu",
                    ln_eps=1e-5)
VISION = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3, image_size=IMG,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, vocab_size=300)
IMAGE_TOKEN = 299
TOKENS = (IMG // 8) ** 2


@pytest.fixture(scope="module")
def siglip_student(tmp_path_factory):
    model, params = make(STUDENT, seed=3)
    x = images()
    _, aux = model.apply({"params": params}, x)
    path = str(tmp_path_factory.mktemp("student") / "student.npz")
    bigvision.save_npz(path, params)
    return model, params, x, np.asarray(aux["encoded"]), path


def _vlm(transformers, torch, arch, vision_type, top=None, **extra):
    torch.manual_seed(0)
    if arch == "paligemma":
        config = transformers.PaliGemmaConfig(
            vision_config=dict(VISION, model_type=vision_type, vision_use_head=False, projection_dim=32),
            text_config=dict(TEXT, model_type="gemma"), image_token_index=IMAGE_TOKEN, projection_dim=32)
        cls = transformers.PaliGemmaForConditionalGeneration
    else:
        config_cls, cls = {"llava": (transformers.LlavaConfig, transformers.LlavaForConditionalGeneration),
                           "llava_onevision": (transformers.LlavaOnevisionConfig,
                                               transformers.LlavaOnevisionForConditionalGeneration)}[arch]
        config = config_cls(vision_config=dict(VISION, model_type=vision_type, **extra),
                            text_config=dict(TEXT, model_type="llama"), image_token_index=IMAGE_TOKEN, **(top or {}))
    model = cls(config).eval()
    with torch.no_grad():  # every tensor random (the norm scales too), so a tensor left as it was shows
        gen = torch.Generator().manual_seed(1)
        for v in model.state_dict().values():
            if v.dtype.is_floating_point:
                v.copy_(0.2 * torch.randn(v.shape, generator=gen))
    return model


def _save(model, folder, layout):
    """transformers' own save_pretrained, or the released checkpoints' layout (vision_tower.vision_model.,
    language_model.model.) in two shards with an index."""
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 16}\n')
    (folder / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5]}\n')
    if layout == "released":
        from safetensors.numpy import save_file

        sd = load_safetensors(str(folder / "model.safetensors"))
        sd = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in sd.items()}
        keys = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in shards.items():
            save_file({k: sd[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        os.remove(folder / "model.safetensors")
        index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())},
                 "weight_map": {k: name for name, part in shards.items() for k in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(folder)


def _tensors(folder):
    """Every tensor's (dtype, shape, bytes) as stored (bfloat16 too)."""
    out = {}
    for fn in vlm.weight_files(folder):
        header, start = vlm.read_header(os.path.join(folder, fn))
        with open(os.path.join(folder, fn), "rb") as f:
            data = f.read()
        out.update({k: (e["dtype"], e["shape"], data[start + e["data_offsets"][0]:start + e["data_offsets"][1]])
                    for k, e in header.items() if k != "__metadata__"})
    return out


def _check_swap(source, output, prefix):
    """Every non-tower tensor bit-identical, every tower tensor replaced, every other file copied as it is."""
    before, after = _tensors(source), _tensors(output)
    assert sorted(before) == sorted(after)
    for k in before:
        assert before[k][:2] == after[k][:2], k
        if k.startswith(prefix):
            assert before[k][2] != after[k][2], f"{k} left as it was"
        else:
            assert before[k][2] == after[k][2], k
    weights = set(vlm.weight_files(source))
    others = sorted(f for f in os.listdir(source) if f not in weights)
    assert others == sorted(f for f in os.listdir(output) if f not in weights)
    for f in others:
        with open(os.path.join(source, f), "rb") as a, open(os.path.join(output, f), "rb") as b:
            assert a.read() == b.read(), f


def _generate(torch, model, input_ids, **inputs):
    out = model.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False, **inputs)
    assert out.shape == (input_ids.shape[0], input_ids.shape[1] + 3)


@pytest.mark.parametrize("layout", ["saved", "released"])
def test_paligemma_gets_the_students_tower_and_keeps_the_rest(torch, transformers, siglip_student, tmp_path,
                                                             layout):
    model, params, x, tokens, student = siglip_student
    source = _save(_vlm(transformers, torch, "paligemma", "siglip_vision_model"), tmp_path / "pg", layout)
    output = str(tmp_path / "out")
    assert export.cli(["--input", student, "--vlm", source, "--to", "paligemma", "--output", output]) == 0
    prefix = "vision_tower.vision_model." if layout == "released" else "vision_tower."
    _check_swap(source, output, prefix)
    pg = transformers.PaliGemmaForConditionalGeneration.from_pretrained(output).eval()
    with torch.no_grad():
        got = pg.model.vision_tower(pixel_values=nchw(torch, x)).last_hidden_state.numpy()
        assert maxdiff(got, tokens) < TOL
        ids = torch.tensor([[IMAGE_TOKEN] * TOKENS + [2, 5, 7]])
        _generate(torch, pg, ids, pixel_values=nchw(torch, x[:1]))


def test_a_bfloat16_vlm_keeps_its_dtype(torch, transformers, siglip_student, tmp_path):
    model, params, *_ = siglip_student
    pg = _vlm(transformers, torch, "paligemma", "siglip_vision_model").to(torch.bfloat16)
    source, output = _save(pg, tmp_path / "pg", "saved"), str(tmp_path / "out")
    vlm.write_hf_vlm(params, model, source, output, target="paligemma")
    _check_swap(source, output, "vision_tower.")
    after = _tensors(output)
    sd, _ = hf.to_hf_state_dict(params, model, "siglip", drop_head=True)
    for k, v in sd.items():
        dtype, shape, data = after["vision_tower." + k[len(hf.P):]]
        assert dtype == "BF16" and data == np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).tobytes(), k


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_llava_gets_the_students_tower(torch, transformers, siglip_student, tmp_path, vision):
    if vision == "clip":
        model, params = make(CLIP_STUDENT, seed=4)
        x = images()
        tokens = np.asarray(model.apply({"params": params}, x)[1]["encoded"])
    else:
        model, params, x, tokens, _ = siglip_student
    # a SigLIP tower keeps its (unused) MAP head: the student takes a teacher's
    teacher = make(dict(SMALL, pool_type="map"), seed=5)[1] if vision == "siglip" else None
    source = _save(_vlm(transformers, torch, "llava", f"{vision}_vision_model"), tmp_path / "llava", "saved")
    output = str(tmp_path / "out")
    vlm.write_hf_vlm(params, model, source, output, target="llava", head_params=teacher)
    _check_swap(source, output, "vision_tower.")
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(output).eval()
    tower = llava.model.vision_tower
    with torch.no_grad():
        out = tower(pixel_values=nchw(torch, x))
        post = getattr(tower, "post_layernorm", None) or tower.vision_model.post_layernorm
        got = (post(out.last_hidden_state) if vision == "clip" else out.last_hidden_state).numpy()
        assert maxdiff(got, tokens) < TOL
        if vision == "siglip":
            head = flatten(teacher["MAPHead_0"])["probe"]
            assert maxdiff(tower.head.probe.numpy(), head) == 0
        n = TOKENS if vision == "clip" else TOKENS - 1  # the 'default' strategy drops the first token
        _generate(torch, llava, torch.tensor([[1] + [IMAGE_TOKEN] * n + [5, 7]]), pixel_values=nchw(torch, x[:1]))


def test_llava_onevision_sharded(torch, transformers, siglip_student, tmp_path):
    model, params, x, tokens, student = siglip_student
    ov = _vlm(transformers, torch, "llava_onevision", "siglip_vision_model",
              top=dict(image_grid_pinpoints=[[IMG, IMG]]), vision_use_head=False)
    source = _save(ov, tmp_path / "ov", "released")
    output = str(tmp_path / "out")
    assert export.cli(["--input", student, "--vlm", source, "--to", "llava", "--output", output]) == 0
    _check_swap(source, output, "vision_tower.vision_model.")
    ov = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(output).eval()
    with torch.no_grad():
        got = ov.model.vision_tower(pixel_values=nchw(torch, x)).last_hidden_state.numpy()
        assert maxdiff(got, tokens) < TOL
        # anyres at one grid point: the base image and one crop
        pixel_values, sizes = nchw(torch, x[:2])[None], torch.tensor([[IMG, IMG]])
        features = ov.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes)
        n = sum(f.shape[0] for f in (features if isinstance(features, (list, tuple)) else features.pooler_output))
        _generate(torch, ov, torch.tensor([[1] + [IMAGE_TOKEN] * n + [5]]), pixel_values=pixel_values,
                  image_sizes=sizes)


def test_a_tower_the_student_does_not_fit_is_one_line(torch, transformers, siglip_student, tmp_path, capsys):
    model, params, x, tokens, student = siglip_student
    source = _save(_vlm(transformers, torch, "paligemma", "siglip_vision_model"), tmp_path / "pg", "saved")
    deeper = str(tmp_path / "deep.npz")
    bigvision.save_npz(deeper, make(dict(STUDENT, depth=3), seed=0)[1])
    output = tmp_path / "out"
    capsys.readouterr()
    assert export.cli(["--input", deeper, "--vlm", source, "--to", "paligemma", "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert "depth (num_hidden_layers) is 2 in the tower, 3 in the ViT" in err and len(err.splitlines()) == 1
    assert not output.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".out")]
    with pytest.raises(ValueError, match=r"LayerNorm eps \(layer_norm_eps\) is 1e-06 in the tower, 1e-05 in the"):
        vlm.write_hf_vlm(params, model.clone(ln_eps=1e-5), source, str(output), target="paligemma")
    with pytest.raises(ValueError, match=r"model_type 'paligemma', expected llava or llava_onevision"):
        vlm.write_hf_vlm(params, model, source, str(output), target="llava")
    llava = _save(_vlm(transformers, torch, "llava", "siglip_vision_model"), tmp_path / "llava", "saved")
    with pytest.raises(ValueError, match=r"MAP head .* pass --head-from TEACHER"):
        vlm.write_hf_vlm(params, model, llava, str(output), target="llava")
    # an output inside the VLM it reads is refused, as for --input
    assert export.cli(["--input", student, "--vlm", source, "--to", "paligemma", "--output",
                       os.path.join(source, "aligned")]) == 2
    assert "is inside the input" in capsys.readouterr().err
    assert export.cli(["--input", student, "--to", "llava", "--output", str(output)]) == 2
    assert "--to llava needs --vlm" in capsys.readouterr().err
    assert export.cli(["--input", student, "--vlm", source, "--to", "hf", "--output", str(output)]) == 2
    assert "--vlm is for --to paligemma or llava, not --to hf" in capsys.readouterr().err


@pytest.mark.parametrize("scan", [True, False])
def test_big_vision_paligemma_npz_gets_img_replaced_and_keeps_the_rest(siglip_student, tmp_path, scan):
    model, params, x, tokens, student = siglip_student
    tower = make(STUDENT, seed=9)[1]
    rng = np.random.default_rng(0)
    flat = {f"params/img/{k}": np.asarray(v).astype(ml_dtypes.bfloat16)
            for k, v in flatten(bigvision.to_layout(tower, scan)).items()}
    flat.update({"params/img/head/kernel": rng.standard_normal((48, 32)).astype(ml_dtypes.bfloat16),
                 "params/img/head/bias": np.zeros(32, ml_dtypes.bfloat16),
                 "params/llm/embedder/input_embedding": rng.standard_normal((300, 32)).astype(ml_dtypes.bfloat16),
                 "params/llm/final_norm/scale": rng.standard_normal(32).astype(np.float32)})
    source, output = str(tmp_path / "pt_224.npz"), str(tmp_path / "aligned.npz")
    np.savez(source, **flat)
    assert export.cli(["--input", student, "--vlm", source, "--to", "paligemma", "--output", output]) == 0
    with np.load(source) as a, np.load(output) as b:
        before, after = {k: a[k] for k in a.files}, {k: b[k] for k in b.files}
    assert sorted(before) == sorted(after)
    ours = flatten(bigvision.to_layout(jax.tree.map(np.asarray, params), scan))
    for k in before:
        assert before[k].dtype == after[k].dtype, k
        name = k[len("params/img/"):]
        if k.startswith("params/img/") and not name.startswith("head/"):
            np.testing.assert_array_equal(after[k].view(ml_dtypes.bfloat16), ours[name].astype(ml_dtypes.bfloat16))
        else:
            assert before[k].tobytes() == after[k].tobytes(), k
    # read back, the tower is the student's function (to bfloat16's precision)
    loaded = bigvision.load_npz(output, dtype=np.float32)
    loaded.pop("head")
    out = model.clone(scan=scan).apply({"params": loaded}, x)[1]["encoded"]
    assert maxdiff(out, tokens) < 0.1
    wide = str(tmp_path / "wide.npz")
    bigvision.save_npz(wide, make(dict(STUDENT, mlp_dim=96), seed=0)[1])
    with pytest.raises(ValueError, match=r"MLP dim is 80 in the tower, 96 in the ViT"):
        export.main(["--input", wide, "--vlm", source, "--to", "paligemma", "--output", str(tmp_path / "x.npz")])
