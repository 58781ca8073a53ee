"""The locality meter (lalign/watch.py): its probe on toy features, its warning, its agreement, and a tiny run that
logs it beside val_loss, computed on the 8-device mesh as it is in memory."""
import json

import jax
import numpy as np
import pytest

from lalign import data as data_lib
from lalign import validate, watch
from lalign.pretrain import pretrain_teacher
from lalign.train import train_maskembed


def _toy(seed=0, n=96, patches=16, classes=5, width=12):
    """Multi-hot patch labels (each class on ~10% of the patches) and features whose first `classes` dimensions
    carry them under noise."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, patches, classes)) < 0.1).astype(np.uint8)
    feats = rng.normal(size=(n, patches, width)).astype(np.float32)
    feats[..., :classes] = 0.3 * feats[..., :classes] + labels
    return feats, labels


def test_probe_recalls_labels_that_features_carry_and_not_from_random_ones():
    feats, labels = _toy()
    good = watch.probe(feats, labels)
    assert good["macro_recall"] > 0.95 and good["miou"] > 0.6, good
    noise = np.random.default_rng(1).normal(size=feats.shape).astype(np.float32)
    bad = watch.probe(noise, labels)
    assert bad["macro_recall"] < 0.7 and bad["miou"] < 0.15, bad
    # a per-feature scale and shift (a re-initialized LayerNorm's) does not change the probe
    scale = np.linspace(0.05, 20.0, feats.shape[-1], dtype=np.float32) * np.where(np.arange(12) % 2, 1, -1)
    moved = watch.probe(feats * scale + 3.0, labels)
    assert moved["macro_recall"] == pytest.approx(good["macro_recall"], abs=1e-9)
    assert moved["miou"] == pytest.approx(good["miou"], abs=1e-3)


def test_warning_fires_when_the_students_features_are_scrambled():
    feats, labels = _toy()
    teacher = watch.probe(feats, labels)
    rng = np.random.default_rng(2)
    scrambled = np.stack([f[rng.permutation(len(f))] for f in feats])  # each image's tokens to other patches
    student = watch.probe(scrambled, labels)
    line = watch.warning(student, teacher, margin=0.03)
    assert line and line.startswith("WARNING: the student's watch recall") and "points below" in line, line
    assert watch.warning(teacher, teacher, margin=0.03) is None
    assert watch.warning({"macro_recall": teacher["macro_recall"] - 0.02}, teacher, margin=0.03) is None


def test_agreement_is_one_for_the_same_tokens_up_to_a_per_feature_affine_map():
    feats, _ = _toy()
    scale = np.linspace(0.5, 4.0, feats.shape[-1], dtype=np.float32)
    assert float(watch.agreement(feats, feats)) == pytest.approx(1.0, abs=1e-5)
    assert float(watch.agreement(feats * scale - 2.0, feats)) == pytest.approx(1.0, abs=1e-5)
    noise = np.random.default_rng(3).normal(size=feats.shape).astype(np.float32)
    assert abs(float(watch.agreement(noise, feats))) < 0.05


def test_config_errors_name_the_field():
    from conftest import load_config

    c = load_config(arg="tiny")
    c.watch.update(source="coco", fit_fraction=1.0)
    assert validate.config_errors(c, 8) == ["config.watch.source must be one of ('', 'scenes', 'folder', 'coco_stuff', "
                                            "'ade20k'), got 'coco'",
                                            "config.watch.fit_fraction must be in (0, 1), got 1.0"]
    c.watch.update(source="folder", images="/imgs")
    errors = validate.config_errors(c, 8)
    assert any("watch.labels (label PNGs) and watch.num_classes" in e for e in errors), errors
    assert any("config.watch.fit_fraction must be in (0, 1), got 1.0" in e for e in errors), errors


def test_a_folder_watch_set_is_batches_on_the_mesh_with_unreadable_examples_weighing_nothing(tiny_config,
                                                                                                tmp_path):
    import segdata

    from lalign import sharding
    from lalign.data import segmentation as seg

    root = str(tmp_path / "coco")
    stems = segdata.write_coco_stuff(root, num_train=10, num_val=2, corrupt=("000000000004",))
    images, labels = f"{root}/images/train2017", f"{root}/stuffthingmaps/train2017"
    tiny_config.data.normalization = "siglip"  # what a real source's config holds
    tiny_config.watch.update(source="folder", images=images, labels=labels, num_classes=182, num_images=10,
                             batch_size=8)
    mesh = sharding.make_mesh(tiny_config.mesh)
    with pytest.warns(UserWarning, match="000000000004"):
        batches, what = watch.watch_batches(tiny_config, 4, mesh)
    assert what.endswith("10 of 10 images (5 fit, 5 read)") and len(batches) == 2  # 10 rows in batches of 8
    fit = np.concatenate([np.asarray(b["fit"]) for b in batches])
    read = np.concatenate([np.asarray(b["eval"]) for b in batches])
    corrupt = stems["train2017"].index("000000000004")  # the subset is all 10, in file order
    assert fit.tolist() == [float(i < 5 and i != corrupt) for i in range(16)]
    assert read.tolist() == [float(5 <= i < 10 and i != corrupt) for i in range(16)]
    ds = seg.SegmentationFolder(images, labels, num_classes=182, image_size=16, patch_size=4)
    got = np.concatenate([np.asarray(b["labels"]) for b in batches])
    assert got.shape == (16, 16, 182)
    np.testing.assert_array_equal(got[0], ds[0]["patch_labels"])
    np.testing.assert_array_equal(got[9], ds[9]["patch_labels"])
    assert not got[10:].any() and not got[corrupt].any()


def test_a_tiny_run_logs_the_meter_beside_val_loss(tiny_config, tmp_path, capsys):
    """metrics.jsonl has the fields at every validation; computed on the 8-device mesh they equal the probe in
    memory; at step 0 the student (its final LayerNorm re-initialized) scores its teacher's recall."""
    teacher = pretrain_teacher(tiny_config, str(tmp_path / "teacher"))
    tiny_config.update(total_steps=6, eval_every=3, quiet=False)
    capsys.readouterr()
    train_maskembed(tiny_config, str(tmp_path / "run"), *teacher)
    out = capsys.readouterr().out
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    fields = {"watch_recall", "watch_miou", "watch_teacher_recall", "watch_teacher_miou", "watch_agreement"}
    assert [r["step"] for r in evals] == [0, 3, 6] and all(fields <= set(r) for r in evals), evals
    first = evals[0]
    assert first["watch_recall"] == pytest.approx(first["watch_teacher_recall"], abs=1e-6)
    assert first["watch_agreement"] == pytest.approx(1.0, abs=1e-4)
    assert "[watch] patch probe on scenes/probe_val, 16 images (8 fit, 8 read): teacher macro recall" in out
    assert "| watch recall" in out and "(teacher " in out and "| agreement " in out

    model, params = teacher  # the teacher's numbers, in memory: what the sharded computation must give
    scenes = data_lib.image_source(tiny_config.data, "probe_val", seed=tiny_config.seed).examples(0, 16)
    backbone = model.clone(pool_type="none", num_classes=None, class_token=model.has_class_token)
    tokens = np.asarray(backbone.apply({"params": params}, scenes["image"])[1]["encoded"][:, model.num_prefix_tokens:])
    want = watch.probe(tokens, scenes["patch_labels"], tiny_config.watch.fit_fraction, tiny_config.watch.ridge)
    assert first["watch_teacher_recall"] == pytest.approx(want["macro_recall"], abs=1e-6)
    assert first["watch_teacher_miou"] == pytest.approx(want["miou"], abs=1e-6)

    # Without labels: the agreement alone.
    tiny_config.watch.source = ""
    tiny_config.update(total_steps=2, eval_every=2)
    train_maskembed(tiny_config, str(tmp_path / "unlabelled"), *teacher)
    with open(tmp_path / "unlabelled" / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    assert [sorted(k for k in r if k.startswith("watch")) for r in evals] == [["watch_agreement"]] * 2
    assert jax.device_count() == 8
