"""The probe on what a real user brings: a Hugging Face DINOv2 saved at its 518 px grid (37x37 position rows),
probed at another resolution on a CamVid-style folder (train/ trainannot/ val/ valannot/ test/ testannot/, 11
classes, void = 11)."""
import json
import os

import numpy as np
import pytest

from lalign import probe
from segdata import write_pair

CAMVID_CLASSES, CAMVID_VOID = 11, 11


def write_camvid(root, sizes=(("train", 6), ("val", 3), ("test", 3)), image=(224, 224), seed=0):
    """CamVid's layout: SPLIT/*.png images and SPLITannot/*.png label maps (0..10, 11 = void)."""
    rng = np.random.default_rng(seed)
    for split, n in sizes:
        for i in range(n):
            labels = rng.integers(0, CAMVID_CLASSES + 1, image).astype(np.uint8)
            pixels = rng.integers(0, 256, (*image, 3)).astype(np.uint8)
            write_pair(os.path.join(root, split), os.path.join(root, split + "annot"), f"{split}_{i:03d}", pixels,
                       labels, ".png")


def camvid_config(root, backbone, **data):
    from conftest import load_config

    cfg = load_config("configs/probe/folder.py", "smoke")
    cfg.backbone = str(backbone)
    cfg.data.update(train_images=f"{root}/train", train_labels=f"{root}/trainannot", val_images=f"{root}/val",
                    val_labels=f"{root}/valannot", test_images=f"{root}/test", test_labels=f"{root}/testannot",
                    num_classes=CAMVID_CLASSES, ignore_index=CAMVID_VOID, **data)
    return cfg


@pytest.fixture(scope="module")
def dinov2_518(torch, transformers, tmp_path_factory):
    """A random Dinov2Model (width 48, 1 block) saved as HF saves DINOv2: image_size 518, 37x37 position rows."""
    from interop import randomize_torch

    root = tmp_path_factory.mktemp("dinov2")
    t = randomize_torch(torch, transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=3, mlp_ratio=2, image_size=518, patch_size=14)))
    t.save_pretrained(root / "hf")
    t.eval()
    write_camvid(str(root / "camvid"))
    return t, root


def test_a_518px_dinov2_is_probed_at_224px_with_its_table_resized_as_training_does(torch, dinov2_518, capsys):
    """--config.data.image_size=224 on a 37x37 checkpoint: the table is resized by training's own function
    (checkpoints.load.fit_posemb) and the log says so. With posemb_resize='bicubic' (what HF DINOv2 does at run
    time) the stored features are HF's own tokens at 224 px."""
    t, root = dinov2_518
    cfg = camvid_config(root / "camvid", root / "hf", image_size=224)
    cfg.features.store = "disk"  # features kept under WORKDIR/features, to compare with HF's
    cfg.posemb_resize = "bicubic"
    res = probe.run(cfg, str(root / "out"))
    err = capsys.readouterr().err
    assert "position table resized 37x37 -> 16x16 patches for 224 px images (bicubic)" in err
    assert res["backbone"]["image_size"] == 224 and res["backbone"]["posemb_resized_from"] == [37, 37]
    assert json.loads((root / "out" / "results.json").read_text())["backbone"]["posemb_resize"] == "bicubic"
    stored = np.load(root / "out" / "features" / "test_features.npy")
    assert stored.shape == (3, 256, 48)
    files = sorted(os.listdir(root / "camvid" / "test"))
    from PIL import Image
    pixels = np.stack([np.asarray(Image.open(root / "camvid" / "test" / f), np.float32) for f in files])
    assert res["backbone"]["normalization"] == "imagenet"  # DINOv2's (its model_type's family)
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    with torch.no_grad():  # 224 px images are not resized
        hf = t(pixel_values=torch.from_numpy((pixels / 255 - mean) / std).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    np.testing.assert_allclose(stored, hf[:, 1:], atol=2e-4)

    # The default is timm's resize (the teacher's in training), and it is said so.
    cfg = camvid_config(root / "camvid", root / "hf", image_size=224)
    res = probe.run(cfg, str(root / "out_default"))
    assert "37x37 -> 16x16 patches for 224 px images (bicubic_antialias, as timm)" in capsys.readouterr().err
    assert res["backbone"]["posemb_resize"] == "bicubic_antialias"


def test_a_checkpoint_grid_kept_or_an_unknown_resize_is_a_clear_error(dinov2_518):
    _, root = dinov2_518
    cfg = camvid_config(root / "camvid", root / "hf", image_size=224)
    cfg.posemb_resize = "none"
    with pytest.raises(ValueError, match=r"posemb_resize='none' keeps the backbone's 37x37 .* needs 16x16"):
        probe.run(cfg, str(root / "none"))
    cfg.posemb_resize = "lanczos"
    with pytest.raises(ValueError, match=r"Invalid probe config \(nothing was written\): config.posemb_resize must be "
                                         r"one of \('bicubic_antialias', .*'none'\), got 'lanczos'"):
        probe.run(cfg, str(root / "lanczos"))
    assert not (root / "lanczos").exists()
    # Without image_size the probe runs at the checkpoint's own size (37 x 14 px), nothing resized.
    model, params, _, _ = probe.load_backbone(str(root / "hf"))
    assert probe.backbone_image_size(model, params) == 518
    assert probe.fit_to_image_size(model, params, 518, "bicubic_antialias") == (params, None)
