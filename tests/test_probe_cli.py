"""The patch probe: metrics on hand-computed cases, and `python -m lalign.probe` end to end on a tiny COCO-Stuff
layout with a random backbone saved as a big_vision npz."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lalign import config as config_lib
from lalign import probe
from lalign.checkpoints import bigvision
from lalign.models.vit import make_vit
from segdata import write_coco_stuff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#                    class 0  1    2    3
LABELS = np.array([[1, 0, 0, 0],
                   [1, 1, 0, 0],
                   [0, 1, 0, 0],
                   [0, 0, 0, 0],
                   [0, 1, 0, 0]], np.float32)
PROBS = np.array([[0.9, 0.6, 0.1, 0.2],
                  [0.2, 0.7, 0.2, 0.1],
                  [0.8, 0.6, 0.3, 0.1],
                  [0.1, 0.1, 0.1, 0.9],
                  [0.1, 0.5, 0.0, 0.0]], np.float32)  # 0.5 is not > 0.5: not predicted


def test_patch_metrics_hand_computed():
    # class 0: positives rows 0,1; predicted rows 0,2 -> TP 1, FN 1, FP 1: recall 1/2, precision 1/2, IoU 1/3.
    # class 1: positives rows 1,2,4; predicted rows 0,1,2 -> TP 2, FN 1 (row 4 at exactly 0.5), FP 1:
    #          recall 2/3, precision 2/3, IoU 2/4.
    # class 2: no positives, no predictions -> undefined everywhere, ignored by every average.
    # class 3: no positives, one prediction -> recall/IoU undefined (ignored), precision 0 (counted).
    m = probe.patch_metrics(PROBS, LABELS)
    assert m["per_class_recall"] == pytest.approx([1 / 2, 2 / 3, None, None])
    assert m["per_class_precision"] == pytest.approx([1 / 2, 2 / 3, None, 0.0])
    assert m["per_class_iou"] == pytest.approx([1 / 3, 2 / 4, None, None])
    assert m["per_class_support"] == [2, 3, 0, 0]
    assert m["macro_recall"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["micro_recall"] == pytest.approx(3 / 5)
    assert m["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    # Patch dimensions are flattened; counts over pieces add up to the whole.
    assert probe.patch_metrics(PROBS[None], LABELS[None]) == m
    counts = probe.add_counts(probe.patch_counts(PROBS[:2], LABELS[:2]), probe.patch_counts(PROBS[2:], LABELS[2:]))
    assert probe.metrics_from_counts(counts) == m
    # Nothing predicted: precision 0 by convention; a perfect prediction: everything 1.
    none = probe.patch_metrics(np.zeros_like(PROBS), LABELS)
    assert none["macro_recall"] == 0 and none["macro_precision"] == 0 and none["miou"] == 0
    perfect = probe.patch_metrics(LABELS, LABELS)
    assert perfect["macro_recall"] == perfect["macro_precision"] == perfect["miou"] == perfect["micro_recall"] == 1


def test_background_token_is_the_unlabelled_patch_farthest_from_objects():
    feats = np.arange(2 * 9 * 1, dtype=np.float32).reshape(2, 9, 1)  # 2 images, 3x3 grid, feature = index
    pl = np.zeros((2, 9, 1), np.float32)
    pl[0, 0] = 1  # object top-left: farthest unlabelled patch is the bottom-right one (8)
    pl[1] = 1  # no background: left out
    x, idx = probe.background_tokens(feats, pl)
    assert idx.tolist() == [0] and x[:, 0].tolist() == [8.0]


def test_background_token_probe_tells_global_from_local_tokens():
    rng = np.random.default_rng(0)
    n, side, c, d = 400, 4, 3, 8
    labels = np.zeros((n, c), np.float32)
    patch_labels = np.zeros((n, side * side, c), np.float32)
    for i in range(n):  # one object per class present, on one patch of the top row
        for k in rng.choice(c, rng.integers(1, c + 1), replace=False):
            labels[i, k] = 1
            patch_labels[i, rng.integers(side), k] = 1
    codes = rng.normal(size=(c, d))
    local = patch_labels @ codes + 0.1 * rng.normal(size=(n, side * side, d))  # a token knows its own patch
    global_ = np.repeat((labels @ codes)[:, None], side * side, 1) + 0.1 * rng.normal(size=(n, side * side, d))
    split = lambda f: ((f[:300], patch_labels[:300], labels[:300]), (f[300:], patch_labels[300:], labels[300:]))  # noqa
    assert probe.background_token_probe(*split(global_)) > 0.95
    assert probe.background_token_probe(*split(local)) < 0.8


def test_train_patch_probe_takes_float16_memmaps_and_uint8_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 4, 8)).astype(np.float32)
    y = (x[..., :3] > 0.5).astype(np.uint8)  # learnable: class k <=> feature k > 0.5
    cfg = ml_collections.ConfigDict(dict(depth=1, epochs=2, batch_size=8, lr=1e-2, lr_min_ratio=0.1,
                                         warmup_steps=1, wd=0.0))
    mm = np.lib.format.open_memmap(str(tmp_path / "x.npy"), mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    log = []
    got = probe.train_patch_probe((mm, y), (mm[:8], y[:8]), (mm[8:], y[8:]), cfg, seed=0, num_heads=2,
                                  log=log.append)
    assert [h["epoch"] for h in log] == [1, 2] and got["history"] == log
    assert got["best_epoch"] in (1, 2)
    assert got["per_class_support"] == y[8:].reshape(-1, 3).sum(0).tolist()


def _known_answer(x_fn, seed=0, n=96, patches=16, classes=4):
    """A probe trained on features made from the labels by `x_fn` (labels: Bernoulli(0.5) per patch and class)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, patches, classes)) < 0.5).astype(np.uint8)
    x = x_fn(rng, y).astype(np.float32)
    cfg = ml_collections.ConfigDict(dict(depth=1, epochs=20, batch_size=16, lr=1e-2, lr_min_ratio=0.1,
                                         warmup_steps=4, wd=0.0))
    split = (n * 2 // 3, n * 5 // 6)
    return probe.train_patch_probe((x[:split[0]], y[:split[0]]), (x[split[0]:split[1]], y[split[0]:split[1]]),
                                   (x[split[1]:], y[split[1]:]), cfg, seed=0, num_heads=2)


def test_the_patch_probe_finds_what_features_encode_and_nothing_in_noise():
    """The central measurement, on tasks with a known answer: patch features that encode each patch's labels
    linearly give recall near 1; features of pure noise give predictions independent of the labels (precision at
    the base rate 0.5, recall that of guessing)."""
    mix = np.random.default_rng(1).normal(size=(4, 16))
    local = _known_answer(lambda rng, y: (2 * y - 1) @ mix + 0.1 * rng.normal(size=(*y.shape[:2], 16)))
    assert local["macro_recall"] > 0.95 and local["macro_precision"] > 0.95
    noise = _known_answer(lambda rng, y: rng.normal(size=(*y.shape[:2], 16)))
    assert abs(noise["macro_precision"] - 0.5) < 0.1 and 0.2 < noise["macro_recall"] < 0.8


def test_seeds_trained_side_by_side_equal_seeds_trained_one_by_one():
    """`train_patch_probe_seeds` (one program for all seeds) against `train_patch_probe` per seed: the same
    epochs chosen and metrics, losses equal up to float rounding."""
    rng = np.random.default_rng(0)
    y = (rng.random((48, 16, 4)) < 0.5).astype(np.uint8)
    x = ((2 * y - 1.0) @ rng.normal(size=(4, 16)) + 0.5 * rng.normal(size=(48, 16, 16))).astype(np.float32)
    cfg = ml_collections.ConfigDict(dict(depth=1, epochs=3, batch_size=16, lr=1e-2, lr_min_ratio=0.1,
                                         warmup_steps=2, wd=1e-4))
    splits = (x[:32], y[:32]), (x[32:40], y[32:40]), (x[40:], y[40:])
    logged = []
    together = probe.train_patch_probe_seeds(*splits, cfg, (0, 1), 2, log=lambda s, h: logged.append((s, h["epoch"])))
    assert logged == [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
    for seed, got in zip((0, 1), together):
        alone = probe.train_patch_probe(*splits, cfg, seed, 2)
        assert got["best_epoch"] == alone["best_epoch"]
        for k in ("macro_recall", "micro_recall", "macro_precision", "miou", "val_macro_recall"):
            assert got[k] == pytest.approx(alone[k], abs=1e-6), k
        np.testing.assert_allclose([h["loss"] for h in got["history"]], [h["loss"] for h in alone["history"]],
                                   rtol=1e-5)
    assert together[0]["history"] != together[1]["history"]  # two seeds, two probes


def test_evaluation_pads_to_the_chunk_a_split_needs_and_the_memory_is_printed(monkeypatch, capsys):
    """A 21-image validation split is evaluated as one 32-row chunk (not padded to 512 rows), every split in the
    same shape (one compiled program), the last chunk of a larger split padded; the memory the probe needs is
    printed before the features are extracted."""
    from lalign.probe import heads

    cap = config_lib.PROBE["eval_batch_size"].default
    assert cap == 512
    assert heads.eval_chunk((21, 40), cap) == 32 and heads.eval_chunk((101, 233), cap) == 128
    assert heads.eval_chunk((500, 1000), cap) == 512  # the demo's splits: the shape they always had
    assert heads.eval_chunk((101, 233), cap=64) == 64 and heads.eval_chunk((3, 5), cap) == 4
    assert heads.eval_chunk((101, 233), cap, fit=100) == 64
    # ViT-S/14 features at 518 px (1,369 patches): a 128-row chunk would need ~13 GB of activations, more than a
    # training step's 7.4: the chunk is limited to 64 rows.
    vit_s = ml_collections.ConfigDict(dict(depth=2, batch_size=32))
    assert heads.probe_memory(1369, 384, 6, 11, vit_s, 1, (101, 233))["chunk"] == 64
    assert heads.probe_memory(256, 384, 6, 11, vit_s, 1, (101, 233))["chunk"] == 128
    seen = []
    real = heads.padded_chunks

    def spy(x, y, chunk):
        for xs, labels in real(x, y, chunk):
            seen.append((xs.shape[0], len(labels)))
            yield xs, labels

    monkeypatch.setattr(heads, "padded_chunks", spy)
    rng = np.random.default_rng(0)

    def split(name, n):
        return probe.array_split(name, name, {"image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
                                              "patch_labels": (rng.random((n, 4, 3)) < 0.3).astype(np.uint8),
                                              "labels": np.ones((n, 3), np.uint8)})

    splits = {"train": split("train", 24), "val": split("val", 21), "test": split("test", 40)}
    cfg = ml_collections.ConfigDict(dict(depth=1, epochs=1, batch_size=8, lr=1e-2, lr_min_ratio=0.1,
                                         warmup_steps=1, wd=0.0, seeds=(0,)))
    features = jax.jit(lambda images: images.reshape(len(images), 4, 48))  # 4 "patches" of width 48
    capsys.readouterr()
    res = probe.evaluate_backbone(features, splits, 4, 48, 2, cfg, image_probe=False)
    assert {rows for rows, _ in seen} == {32}  # one shape, never 512
    assert [n for _, n in seen] == [21, 32, 8]  # validation, then the test split in two chunks
    assert res["patch"]["runs"][0]["best_epoch"] == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("[probe] memory:"))
    assert out.index("[probe] memory:") < out.index("[probe] features train")
    assert "85 images x 4 patches x 48 float32" in line and "evaluation" in line and "(chunk 32)" in line
    assert "batch 8 x 1" in line and "in memory" in line


def test_the_epoch_is_chosen_by_a_score_a_degenerate_probe_cannot_win():
    """Epoch 1 predicts every class on every patch (recall ~1, precision 0.27, mIoU 0.14, as a 10-epoch CamVid probe
    did): validation recall, the paper's reported metric, picks it; validation mIoU, the default, does not."""
    history = [{"epoch": 1, "val_macro_recall": 0.97, "val_miou": 0.14},
               {"epoch": 2, "val_macro_recall": 0.55, "val_miou": 0.31},
               {"epoch": 3, "val_macro_recall": 0.62, "val_miou": 0.41},
               {"epoch": 4, "val_macro_recall": 0.63, "val_miou": 0.41}]  # a tie keeps the earlier epoch
    assert probe.select_epoch(history, "recall") == 1
    assert probe.select_epoch(history, "miou") == probe.select_epoch(history) == 3
    with pytest.raises(ValueError, match=r"probe.select_by='f1'; choose from \['miou', 'recall'\]"):
        probe.select_epoch(history, "f1")
    # The warning: on an all-positive prediction, not on PROBS (6 of 20 pairs predicted).
    everything = probe.patch_metrics(np.ones_like(PROBS), LABELS)
    assert everything["predicted_positive_rate"] == 1 and everything["macro_recall"] == 1
    assert probe.patch_metrics(PROBS, LABELS)["predicted_positive_rate"] == pytest.approx(6 / 20)
    run = lambda m: {**m, "best_epoch": 1, "history": [], "selected_by": "recall"}  # noqa: E731
    patch = probe.summarize_runs([run(probe.patch_metrics(PROBS, LABELS)), run(everything)])
    assert patch["degenerate_runs"] == [1] and patch["selected_by"] == "recall"
    warning = probe.degenerate_warning(patch, "teacher")
    assert "teacher" in warning and "[1] of 2" in warning and "[1.0]" in warning and "select_by='miou'" in warning
    assert probe.degenerate_warning(probe.summarize_runs([run(probe.patch_metrics(PROBS, LABELS))]), "x") is None
    # With the epoch records at hand, the warning names the epoch validation mIoU chooses, or says it is the same.
    logged = probe.summarize_runs([{**run(everything), "history": history}])
    assert "validation mIoU (probe.select_by='miou') chooses epoch(s) [3]" in probe.degenerate_warning(logged, "t")
    same = probe.summarize_runs([{**run(everything), "history": history, "best_epoch": 3}])
    assert "chooses the same epoch(s): the probe had not learned" in probe.degenerate_warning(same, "t")
    # Where most (patch, class) pairs are labeled positive, predicting most of them is no warning.
    crowded = np.ones_like(LABELS)
    crowded[0, 0] = 0
    assert probe.degenerate_warning(probe.summarize_runs([run(probe.patch_metrics(np.ones_like(PROBS), crowded))]),
                                    "x") is None
    assert "predict [1.0] of all" in probe.per_class_table(
        {"backbone": {"path": "b"}, "data": {"name": "d", "label_rule": "union", "num_classes": 4, "splits": {}},
         "patch": patch, "per_class": []})


@pytest.mark.parametrize("select_by", ["miou", "recall"])
def test_training_chooses_the_epoch_by_select_by_and_warns_on_an_all_positive_probe(select_by, capsys):
    """The training loop applies `select_epoch`'s rule to the epochs it logs; a probe trained on patches that are
    all positive predicts every class on held-out patches, and the log and the results say so."""
    rng = np.random.default_rng(0)

    def split(name, n, rate):
        return probe.array_split(name, name, {"image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
                                              "patch_labels": (rng.random((n, 4, 3)) < rate).astype(np.uint8),
                                              "labels": np.ones((n, 3), np.uint8)})

    splits = {"train": split("train", 48, 1.0), "val": split("val", 8, 0.3), "test": split("test", 8, 0.3)}
    cfg = ml_collections.ConfigDict(dict(depth=1, epochs=3, batch_size=8, lr=3e-2, lr_min_ratio=0.1,
                                         warmup_steps=1, wd=0.0, seeds=(0, 1), select_by=select_by))
    features = jax.jit(lambda images: images.reshape(len(images), 4, 48))
    res = probe.evaluate_backbone(features, splits, 4, 48, 2, cfg, image_probe=False, what="probe teacher")
    patch = res["patch"]
    for r in patch["runs"]:
        assert r["selected_by"] == select_by and r["best_epoch"] == probe.select_epoch(r["history"], select_by)
        assert {"val_miou", "val_predicted_positive_rate"} <= set(r["history"][0])
    assert patch["predicted_positive_rate"] > 0.9 and patch["degenerate_runs"] == [0, 1]
    assert len(patch["warnings"]) == 1 and "probe teacher" in patch["warnings"][0]
    assert "[probe teacher] WARNING: probe teacher: at the chosen epoch" in capsys.readouterr().out


def test_warm_up_is_sized_to_the_data_and_stays_the_papers_500_steps_at_coco_scale(capsys):
    from conftest import load_config

    from lalign.probe import heads

    cfg = load_config("configs/probe/folder.py", "full").probe
    coco = heads.probe_schedule(load_config("configs/probe/coco_stuff.py", "full").probe, 118_287 - 5_000)
    assert (coco["total"], coco["warmup"]) == (5 * 3541, 500) and "WARNING" not in coco["line"]
    ade = heads.probe_schedule(load_config("configs/probe/ade20k.py", "full").probe, 20_210 - 2_000)
    assert (ade["total"], ade["warmup"]) == (2850, 500) and "WARNING" not in ade["line"]
    camvid = heads.probe_schedule(cfg, 367)  # 12 steps an epoch: 500 warm-up steps would be the whole run
    assert (camvid["total"], camvid["warmup"]) == (60, 12)
    assert "warm-up 12 (0.2 of the steps" in camvid["line"] and "very short schedule (60 steps" in camvid["line"]
    assert "mostly warm-up" not in camvid["line"]
    # Without warmup_fraction (the demo's probe): warmup_steps as given, below the total; the smoke run's schedule
    # is mostly warm-up, and says so.
    assert heads.probe_schedule(load_config("configs/demo.py", "full").probe, 4000)["warmup"] == 100
    smoke = heads.probe_schedule(load_config("configs/demo.py", "smoke").probe, 400)
    assert (smoke["total"], smoke["warmup"]) == (39, 38) and "mostly warm-up (38 of 39 steps)" in smoke["line"]
    # Training logs the line before its first step and records the schedule it ran.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4, 8)).astype(np.float32), (rng.random((40, 4, 3)) < 0.5).astype(np.uint8)
    small = ml_collections.ConfigDict(dict(depth=1, epochs=2, batch_size=8, lr=1e-2, lr_min_ratio=0.1,
                                           warmup_steps=500, warmup_fraction=0.2, wd=0.0))
    capsys.readouterr()
    got = probe.train_patch_probe((x, y), (x[:8], y[:8]), (x[8:], y[8:]), small, seed=0, num_heads=2)
    assert (got["steps"], got["warmup_steps"]) == (10, 2)
    assert "[probe] schedule: 10 steps (2 epochs x 5 of batch 8), warm-up 2" in capsys.readouterr().out


def test_probes_that_peak_at_their_last_epoch_are_flagged():
    def run(val_curve):
        history = [{"epoch": i + 1, "val_macro_recall": v} for i, v in enumerate(val_curve)]
        return {"best_epoch": int(np.argmax(val_curve)) + 1, "history": history}

    patch = {"runs": [run([0.1, 0.3, 0.2]), run([0.1, 0.2, 0.4]), run([0.5])]}
    assert probe.probes_best_at_last_epoch(patch) == [1, 2]  # the one-epoch probe peaks at its last epoch too
    warning = probe.convergence_warning(patch, "teacher")
    assert "teacher" in warning and "[1, 2] of 3" in warning and "probe.epochs" in warning
    converged = {"runs": [run([0.1, 0.3, 0.2])]}
    assert probe.probes_best_at_last_epoch(converged) == [] and probe.convergence_warning(converged, "x") is None
    assert probe.probes_best_at_last_epoch({}) == []  # results without per-run histories: nothing to say


@pytest.fixture
def coco_and_backbone(tmp_path):
    stems = write_coco_stuff(str(tmp_path / "coco"), num_train=12, num_val=6, corrupt=["000000000003"])
    model = make_vit(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8, pool_type="map")
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    bigvision.save_npz(str(tmp_path / "vit.npz"), params)
    return tmp_path, stems


def test_probe_cli_end_to_end_on_coco_stuff_layout(coco_and_backbone):
    tmp_path, stems = coco_and_backbone
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lalign.probe", "--config=configs/probe/coco_stuff.py:smoke",
           f"--config.backbone={tmp_path / 'vit.npz'}", f"--config.data.root={tmp_path / 'coco'}",
           "--config.data.num_val=4", "--config.probe.seeds=(0,1)", f"--workdir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test macro recall" in proc.stdout and "000000000003.jpg" in proc.stderr  # the skip is announced
    res = json.loads((out / "results.json").read_text())
    # The image size comes from the backbone's position embedding (4x4 patches of 8 px).
    assert res["backbone"]["image_size"] == 32 and res["backbone"]["format"] == "bigvision"
    p = res["patch"]
    for r in p["runs"]:  # the reported numbers are the per-class ones, aggregated over the classes they cover
        recall = [x for x, n in zip(r["per_class_recall"], r["per_class_support"]) if n]
        assert r["macro_recall"] == pytest.approx(np.mean(recall))
        assert r["miou"] == pytest.approx(np.mean([x for x in r["per_class_iou"] if x is not None]))
    assert len(p["runs"]) == 2 and len(p["macro_recall_per_seed"]) == 2
    assert p["macro_recall"] == pytest.approx(np.mean(p["macro_recall_per_seed"]))
    assert all(1 <= r["best_epoch"] <= 2 and len(r["history"]) == 2 for r in p["runs"])
    # 12 train2017 images: 4 carved out for validation, the rest train; val2017 is the test split; the corrupt
    # JPEG is skipped and reported in the split it belongs to.
    splits = res["data"]["splits"]
    assert splits["train"]["count"] + splits["val"]["count"] == 11 and splits["test"]["count"] == 6
    skipped = splits["train"]["skipped"] + splits["val"]["skipped"]
    assert len(skipped) == 1 and skipped[0]["file"].endswith("000000000003.jpg")
    assert res["data"]["num_classes"] == 182 and len(res["per_class"]) == 182
    # Only the data set's 6 classes have test positives (4 patches x 6 images = 24 positives per half).
    support = {r["name"]: r["test_positives"] for r in res["per_class"] if r["test_positives"]}
    assert set(support) <= {"person", "car", "banner", "grass", "sky-other", "wood"}
    assert sum(support.values()) == 6 * 16  # 6 images x 16 patches, each patch in one class
    table = (out / "per_class.md").read_text()
    assert "| 0 | person |" in table and "macro recall" in table


def test_probe_module_defines_no_flags_when_imported():
    # lalign.pipeline imports lalign.probe next to lalign.main's --config/--workdir: no duplicate flags.
    mine = "sorted(m for m in flags.FLAGS.flags_by_module_dict() if 'lalign' in m)"
    code = (f"from absl import flags; import lalign.probe; print({mine}); import lalign.main; "
            f"print(flags.FLAGS['config'].help)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # no DuplicateFlagError
    defined_by_probe, config_help = proc.stdout.splitlines()[:2]
    assert defined_by_probe == "[]" and config_help.startswith("Experiment config file")  # lalign.main's --config


def test_clear_errors(coco_and_backbone):
    from conftest import load_config

    tmp_path, _ = coco_and_backbone
    cfg = load_config("configs/probe/coco_stuff.py", "smoke")
    with pytest.raises(ValueError, match="config.backbone must name"):
        probe.run(cfg, str(tmp_path / "a"))
    cfg.backbone = str(tmp_path / "vit.npz")
    with pytest.raises(ValueError, match="config.data.root"):
        probe.run(cfg, str(tmp_path / "b"))
    cfg.data.root = str(tmp_path / "coco")
    cfg.data.label_rule = "most"
    with pytest.raises(ValueError, match="label_rule"):
        probe.run(cfg, str(tmp_path / "c"))
    with pytest.raises(ValueError, match="'full' or 'smoke'"):
        load_config("configs/probe/coco_stuff.py", "tiny")


def test_folder_config_splits(coco_and_backbone):
    """configs/probe/folder.py: its own val split when given, else one carved out of train; test as given."""
    from conftest import load_config

    tmp_path, stems = coco_and_backbone
    img, lbl = tmp_path / "coco" / "images", tmp_path / "coco" / "stuffthingmaps"
    cfg = load_config("configs/probe/folder.py", "smoke")
    cfg.data.update(train_images=str(img / "train2017"), train_labels=str(lbl / "train2017"),
                    test_images=str(img / "val2017"), test_labels=str(lbl / "val2017"), num_classes=182,
                    num_val=3, num_train=-1, num_test=4)
    splits, names = probe.probe_splits(cfg, 32, 8, "siglip")
    assert (splits["train"].size, splits["val"].size, splits["test"].size) == (9, 3, 4)
    assert "carved out" in splits["val"].source and names[:2] == ["0", "1"]
    cfg.data.update(val_images=str(img / "val2017"), val_labels=str(lbl / "val2017"), num_train=5)
    splits, _ = probe.probe_splits(cfg, 32, 8, "siglip")
    assert (splits["train"].size, splits["val"].size, splits["test"].size) == (5, 6, 4)
    batch = next(splits["test"].batches(4))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["patch_labels"].shape == (4, 16, 182)
    cfg.data.test_images = ""
    with pytest.raises(ValueError, match="test_images"):
        probe.probe_splits(cfg, 32, 8, "siglip")


def test_ade20k_config_reads_the_standard_layout(tmp_path):
    """configs/probe/ade20k.py: ADEChallengeData2016's folders, 150 classes, PNG 0 ("other") counts for no class
    and k for class k-1; validation is the test split, the validation split is carved out of training."""
    from conftest import load_config
    from segdata import write_ade20k

    from lalign.data import segmentation as seg

    write_ade20k(str(tmp_path / "ade"), num_train=8, num_val=4)
    assert len(seg.ADE20K_CLASSES) == seg.ADE20K_NUM_CLASSES == 150
    cfg = load_config("configs/probe/ade20k.py", "smoke")
    cfg.data.update(root=str(tmp_path / "ade"), num_val=3)
    splits, names = probe.probe_splits(cfg, 32, 8, "siglip")
    assert (splits["train"].size, splits["val"].size, splits["test"].size) == (5, 3, 4)
    assert names[0] == "wall" and names[149] == "flag" and "carved out" in splits["val"].source
    batch = next(splits["test"].batches(4))
    labels = batch["patch_labels"]  # 4x4 patches of 8 px: the top band is 4 px of "other" (no class)
    assert labels.shape == (4, 16, 150)
    grid = labels[0].reshape(4, 4, 150)
    assert grid[:, :2, 0].all() and not grid[:, :2, 1:].any()  # left half: wall only
    assert grid[:, 2:, 149].all() and not grid[:, 2:, :149].any()  # right half: flag only
    assert set(np.flatnonzero(batch["labels"][0])) == {0, 149}  # "other" is no class
    cfg.data.root = ""
    with pytest.raises(ValueError, match="ADEChallengeData2016"):
        probe.probe_splits(cfg, 32, 8, "siglip")
