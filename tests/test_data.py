"""Real-image data sources: image folders and TFDS ArrayRecord files, on tiny data the tests write."""
import io
import os
import warnings

import ml_collections
import numpy as np
import pytest
from PIL import Image

from lalign import data as data_lib
from lalign.data import images as images_lib
from lalign.data.images import NORMALIZATION, CorruptImageWarning

SIZE = 16
# Prefetching threads may meet the corrupt file after a test's own warning filter has ended.
pytestmark = pytest.mark.filterwarnings("ignore::lalign.data.images.CorruptImageWarning")


def _write_images(root, rng, specs):
    for rel, (w, h), mode in specs:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(path)


GOOD = [("cat/a.png", (40, 30), "RGB"), ("cat/b.JPEG", (300, 200), "RGB"), ("cat/c.webp", (33, 77), "RGB"),
        ("dog/d.jpg", (64, 64), "L"), ("dog/e.png", (20, 50), "RGBA"), ("dog/sub/f.jpeg", (100, 41), "RGB"),
        ("top.png", (24, 24), "RGB")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train/: 7 good images in class folders (various sizes, modes, formats) + 1 corrupt file + 1 non-image;
    val/: 3 images."""
    base = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    train, val = str(base / "train"), str(base / "val")
    _write_images(train, rng, GOOD)
    with open(os.path.join(train, "dog", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
    with open(os.path.join(train, "notes.txt"), "w") as f:
        f.write("ignored: not an image extension")
    _write_images(val, rng, [("x/v1.png", (30, 30), "RGB"), ("x/v2.jpg", (50, 20), "RGB"),
                             ("y/v3.png", (18, 40), "RGB")])
    return train, val


def _cfg(path, **kw):
    return ml_collections.ConfigDict(dict(dict(name="image_folder", path=path, image_size=SIZE, num_workers=0), **kw))


def _quiet(source, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        return source.batch(*args)


def test_shapes_labels_and_value_range_per_normalization(folders):
    """Batches are uint8 pixels, the same whatever the normalization; the device normalizes them per run."""
    import jax

    train, val = folders
    batches = {}
    for norm in ("siglip", "clip", "imagenet"):
        src = data_lib.image_source(_cfg(train, val_path=val, normalization=norm), "maskembed", seed=0)
        b = batches[norm] = _quiet(src, 0, 6)
        assert b["image"].shape == (6, SIZE, SIZE, 3) and b["image"].dtype == np.uint8
        assert b["image"].max() - b["image"].min() > 128  # random images: not a constant
        assert b["label"].dtype == np.int32 and set(b["label"]) <= {-1, 0, 1}
        x = np.asarray(jax.jit(images_lib.device_normalize, static_argnums=1)(b["image"], norm))
        mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION[norm])
        assert x.dtype == np.float32
        np.testing.assert_allclose(x * std + mean, b["image"] / 255, atol=1e-6)  # back to [0, 1]
    for norm in ("clip", "imagenet"):
        np.testing.assert_array_equal(batches[norm]["image"], batches["siglip"]["image"])
    floats = np.linspace(-1, 1, 2 * 3 * 4 * 3, dtype=np.float32).reshape(2, 3, 4, 3)  # the scenes: passed through
    np.testing.assert_array_equal(jax.jit(images_lib.device_normalize, static_argnums=1)(floats, "clip"), floats)


def _old_rows(src, start, count):
    """The uint8 rows the sources built before normalizing, by the recipe of `lalign.data.images`: example, per-row
    generator, a replacement drawn from it for an unreadable one."""
    rows = []
    for g in range(start, start + count):
        example = src.example_id(g)
        for attempt in range(images_lib.MAX_ATTEMPTS):
            rng = np.random.default_rng([src.seed, images_lib.split_code(src.split), g, attempt])
            if attempt:
                example = int(src.members[rng.integers(len(src.members))])
            try:
                rows.append(images_lib.decode_and_crop(src.load(example)[0], SIZE, src.train, rng, src.opts))
                break
            except Exception:  # noqa: BLE001 - skipped, as the source skips it
                continue
    return np.stack(rows)


def _old_normalize(pixels, norm):
    """The host normalization the sources applied before it moved to the device."""
    mean, std = NORMALIZATION[norm]
    x = pixels.astype(np.float32) * np.float32(1 / 255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _check_uint8_against_old(src, steps, batch, norm):
    import jax

    on_device = jax.jit(images_lib.device_normalize, static_argnums=1)
    for step in steps:
        b = _quiet(src, step, batch)
        old = _old_rows(src, step * batch, batch)
        assert b["image"].dtype == np.uint8
        np.testing.assert_array_equal(b["image"], old)  # bit-identical pixels
        new, before = np.asarray(on_device(b["image"], norm)), _old_normalize(old, norm)
        assert new.dtype == np.float32
        np.testing.assert_allclose(new, before, rtol=1e-6, atol=1e-6 * np.abs(before).max())


@pytest.mark.parametrize("norm", ["siglip", "clip"])
def test_image_folder_uint8_batches_are_the_old_pixels_and_the_device_normalizes_them_as_the_host_did(folders,
                                                                                                      norm):
    train, val = folders
    _check_uint8_against_old(data_lib.image_source(_cfg(train, val_path=val, normalization=norm), "maskembed",
                                                   seed=3), (0, 1, 5), 4, norm)
    _check_uint8_against_old(data_lib.image_source(_cfg(train, val_path=val, normalization=norm), "maskembed_val",
                                                   seed=3), (0, 1), 3, norm)


def test_class_folders_give_labels_and_every_extension_is_found(folders):
    train, val = folders
    src = data_lib.image_source(_cfg(train, val_path=val), "maskembed")
    assert src.classes == ("cat", "dog")
    names = sorted(os.path.relpath(src.path(i), train) for i in src.members)
    assert names == sorted([rel for rel, _, _ in GOOD] + ["dog/broken.jpg"])  # notes.txt is not an image
    labels = {os.path.relpath(src.path(i), train): int(src.labels[i]) for i in src.members}
    assert labels["cat/a.png"] == 0 and labels["dog/sub/f.jpeg"] == 1 and labels["top.png"] == -1


def test_batches_are_a_pure_function_of_seed_split_and_step(folders):
    train, val = folders
    cfg = _cfg(train, val_path=val)
    a = data_lib.image_source(cfg, "maskembed", seed=0)
    b = data_lib.image_source(cfg, "maskembed", seed=0)  # a fresh source, as after a restart
    first = _quiet(a, 3, 4)
    np.testing.assert_array_equal(_quiet(b, 3, 4)["image"], first["image"])
    np.testing.assert_array_equal(_quiet(a, 3, 4)["image"], first["image"])  # asking again (prefetch cache)
    assert not np.array_equal(_quiet(a, 4, 4)["image"], first["image"])
    other_seed = data_lib.image_source(cfg, "maskembed", seed=1)
    assert not np.array_equal(_quiet(other_seed, 3, 4)["image"], first["image"])


def test_host_shards_concatenate_to_the_global_batch(folders):
    train, val = folders
    cfg = _cfg(train, val_path=val)
    whole = _quiet(data_lib.image_source(cfg, "maskembed"), 2, 8)
    src = data_lib.image_source(cfg, "maskembed")
    parts = [_quiet(src, 2, 8, (i, 4)) for i in (3, 1, 0, 2)]  # any order; each host builds only its slice
    parts = [parts[2], parts[1], parts[3], parts[0]]
    for key in ("image", "label", "index"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    assert parts[0]["image"].shape[0] == 2
    with pytest.raises(ValueError, match="not divisible by 3 hosts"):
        src.batch(0, 8, (0, 3))


def test_each_epoch_visits_every_image_once_in_a_new_order(folders):
    train, val = folders
    src = data_lib.image_source(_cfg(train, val_path=val), "maskembed")
    n = len(src)
    epochs = [[src.example_id(g) for g in range(e * n, (e + 1) * n)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == sorted(src.members.tolist())
    assert len({tuple(o) for o in epochs}) == 3


def test_training_augments_and_validation_does_not(folders):
    train, val = folders
    src = data_lib.image_source(_cfg(train, val_path=val), "maskembed")
    n = len(src)
    g0 = next(g for g in range(n) if not src.path(src.example_id(g)).endswith("broken.jpg"))
    g1 = next(g for g in range(n, 2 * n) if src.example_id(g) == src.example_id(g0))
    a, b = _quiet(src, g0, 1)["image"], _quiet(src, g1, 1)["image"]  # same image, another epoch
    assert not np.array_equal(a, b)
    v = data_lib.image_source(_cfg(train, val_path=val), "maskembed_val")
    assert len(v) == 3
    m = len(v)
    for g in range(m):
        same = next(h for h in range(m, 2 * m) if v.example_id(h) == v.example_id(g))
        np.testing.assert_array_equal(v.batch(g, 1)["image"], v.batch(same, 1)["image"])
    # A validation image is the centre square, resized (bicubic, the default interpolation): check one against PIL.
    g = next(g for g in range(m) if v.path(v.example_id(g)).endswith("v2.jpg"))  # 50 x 20
    with Image.open(v.path(v.example_id(g))) as img:
        expected = np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC, box=(15, 0, 35, 20)))
    np.testing.assert_array_equal(v.batch(g, 1)["image"][0], expected)


def test_random_train_interpolation_is_drawn_per_row_and_validation_keeps_its_own(folders):
    """'random' (the default): each training row is resized with bilinear or bicubic, one drawn from the row's own
    generator, so a batch is still a function of (seed, step) and a host's rows are the global batch's rows."""
    train, val = folders
    assert images_lib.COMMON_OPTIONS["train_interpolation"] == "random"
    cfg = lambda **kw: _cfg(train, val_path=val, flip=False, prefetch=False, **kw)  # noqa: E731
    step, batch = 2, 16  # two epochs of the 8 files, the corrupt one replaced from the same generator
    rows = _quiet(data_lib.image_source(cfg(), "maskembed"), step, batch)["image"]
    fixed = {name: _quiet(data_lib.image_source(cfg(train_interpolation=name), "maskembed"), step, batch)["image"]
             for name in ("bilinear", "bicubic")}
    drawn = []
    for r in range(batch):  # the same crop as the fixed filters (no draw after the filter), so one matches exactly
        same = [name for name, images in fixed.items() if np.array_equal(images[r], rows[r])]
        assert len(same) == 1, (r, same)
        drawn += same
    assert {"bilinear", "bicubic"} == set(drawn)
    again = data_lib.image_source(cfg(), "maskembed")  # a fresh source, as after a restart; one host of four
    np.testing.assert_array_equal(_quiet(again, step, batch, (1, 4))["image"], rows[4:8])
    np.testing.assert_array_equal(_quiet(again, step, batch)["image"], rows)
    other_seed = _quiet(data_lib.image_source(cfg(), "maskembed", seed=1), step, batch)["image"]
    assert not np.array_equal(other_seed, rows)
    # "" uses config.data.interpolation for training too.
    for name in ("bilinear", "bicubic"):
        plain = data_lib.image_source(_cfg(train, val_path=val, train_interpolation="", interpolation=name),
                                      "maskembed")
        pinned = data_lib.image_source(_cfg(train, val_path=val, train_interpolation=name), "maskembed")
        np.testing.assert_array_equal(_quiet(plain, step, batch)["image"], _quiet(pinned, step, batch)["image"])
    # Validation resizes with config.data.interpolation whatever train_interpolation says.
    val_images = {name: data_lib.image_source(cfg(train_interpolation=name), "maskembed_val").batch(0, 3)["image"]
                  for name in ("random", "bilinear", "bicubic", "")}
    for images in val_images.values():
        np.testing.assert_array_equal(images, val_images["bicubic"])
    bilinear_val = data_lib.image_source(cfg(interpolation="bilinear"), "maskembed_val").batch(0, 3)["image"]
    assert not np.array_equal(bilinear_val, val_images["bicubic"])
    # Each filter with probability 1/2, as timm's random.choice.
    picks = [images_lib.train_resample(np.random.default_rng([0, g]), {"train_interpolation": "random"})
             for g in range(4000)]
    assert set(picks) == {Image.BILINEAR, Image.BICUBIC}
    assert abs(np.mean(np.asarray(picks) == Image.BICUBIC) - 0.5) < 0.03


def test_held_out_validation_images_are_disjoint_and_independent_of_the_seed(folders):
    train, _ = folders
    cfg = _cfg(train, num_val=3)
    tr, va = (data_lib.image_source(cfg, s, seed=0) for s in ("maskembed", "maskembed_val"))
    assert len(va) == 3 and len(tr) == 5
    assert not set(tr.members) & set(va.members) and len(set(tr.members) | set(va.members)) == 8
    np.testing.assert_array_equal(data_lib.image_source(cfg, "maskembed_val", seed=5).members, va.members)
    with pytest.raises(ValueError, match="num_val=8 must be between 1 and 7"):
        data_lib.image_source(_cfg(train, num_val=8), "maskembed")


def test_corrupt_image_is_skipped_counted_and_named(folders):
    train, val = folders
    src = data_lib.image_source(_cfg(train, val_path=val, prefetch=False), "maskembed")
    n = len(src)
    assert n == 8
    with pytest.warns(CorruptImageWarning, match=r"dog/broken\.jpg"):
        batch = src.batch(0, n)  # one whole epoch: the corrupt file is met exactly once
    assert np.isfinite(batch["image"]).all() and batch["image"].shape == (n, SIZE, SIZE, 3)
    assert src.num_skipped == 1
    assert list(src.skipped) == [os.path.join(train, "dog", "broken.jpg")]
    _quiet(src, 1, n)  # the next epoch meets it again: still one distinct skipped image
    assert src.num_skipped == 1
    # The replacement is deterministic: a fresh source builds the same batch.
    again = _quiet(data_lib.image_source(_cfg(train, val_path=val, prefetch=False), "maskembed"), 0, n)
    np.testing.assert_array_equal(again["image"], batch["image"])


def test_a_folder_of_unreadable_files_is_a_clear_error(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_bytes(b"garbage")
    src = data_lib.image_source(_cfg(str(tmp_path), val_path=str(tmp_path)), "maskembed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        with pytest.raises(RuntimeError, match=r"16 images in a row could not be read.*bad\d\.png"):
            src.batch(0, 1)
    assert src.num_skipped == 3


def test_file_list_is_written_once_and_reused(folders, tmp_path):
    train, val = folders
    listing = str(tmp_path / "files.txt")
    first = data_lib.image_source(_cfg(train, val_path=val, file_list=listing), "maskembed")
    with open(listing) as f:
        lines = f.read().split()
    assert len(lines) == 8 and "cat/a.png" in lines
    with open(listing, "w") as f:  # the list, not a new walk, decides what is read
        f.write("\n".join(lines[:4]) + "\n")
    again = data_lib.image_source(_cfg(train, val_path=val, file_list=str(listing)), "maskembed")
    assert len(first) == 8 and len(again) == 4


def test_bad_inputs_are_clear_errors(folders, tmp_path):
    train, _ = folders
    with pytest.raises(ValueError, match=r"Unknown config.data.name 'imagenet'.*image_folder"):
        data_lib.image_source(ml_collections.ConfigDict({"name": "imagenet"}), "maskembed")
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match=missing):
        data_lib.image_source(_cfg(missing), "maskembed")
    with pytest.raises(ValueError, match="must name the image folder"):
        data_lib.image_source(_cfg(""), "maskembed")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"No images .* under '{empty}'"):
        data_lib.image_source(_cfg(str(empty)), "maskembed")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['imagesize'\]"):
        data_lib.image_source(_cfg(train, imagesize=3), "maskembed")
    with pytest.raises(ValueError, match="normalization 'openai' is unknown"):
        data_lib.image_source(_cfg(train, normalization="openai"), "maskembed")
    with pytest.raises(ValueError, match=r"config.data.train_interpolation must be one of \('random', 'bicubic', "
                                         r"'bilinear', ''\).*got 'nearest'"):
        data_lib.image_source(_cfg(train, train_interpolation="nearest"), "maskembed")
    with pytest.raises(ValueError, match="Unknown split 'holdout'"):
        data_lib.image_source(_cfg(train), "holdout")


def test_random_resized_crop_box_stays_inside_and_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(8, 400, 2))
        left, top, right, bottom = images_lib.random_resized_crop_box(rng, w, h, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
    # When a draw fits, area and ratio are within bounds (up to rounding).
    left, top, right, bottom = images_lib.random_resized_crop_box(np.random.default_rng(1), 1000, 1000,
                                                                  (0.25, 0.25), (1.0, 1.0))
    assert (right - left, bottom - top) == (500, 500)


def test_fixed_batches_match_the_batches_of_the_same_steps(folders):
    train, val = folders
    cfg = _cfg(train, val_path=val)
    fixed = data_lib.fixed_batches(cfg, "maskembed_val", 2, 2)
    src = data_lib.image_source(cfg, "maskembed_val")
    for i, b in enumerate(fixed):
        np.testing.assert_array_equal(b["image"], src.batch(i, 2)["image"])


# ------------------------------------------------------------------------------------------- tfds ArrayRecord
@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """data_dir/toy/1.0.0/ as TFDS itself prepares it (`download_and_prepare(file_format="array_record")`, no
    TensorFlow: the images are given encoded): a 9-record train split (label 7's image corrupt) and a 3-record
    validation split, labels 0..11 in generation order (TFDS stores the records shuffled by key)."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds source needs pip install 'lalign[tfds]'")
    import io

    rng = np.random.default_rng(0)

    def png(w, h):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    images = {"train": [b"corrupt bytes" if j == 7 else png(20 + 3 * j, 30 - j) for j in range(9)],
              "validation": [png(20 + 3 * j, 30 - j) for j in range(3)]}

    class Toy(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(), "label": tfds.features.ClassLabel(num_classes=12)}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in images}

        def _generate_examples(self, split):
            first = 0 if split == "train" else 9
            for j, data in enumerate(images[split]):
                yield f"{split}{j}", {"image": io.BytesIO(data), "label": first + j}

    root = tmp_path_factory.mktemp("tfds")
    Toy(data_dir=str(root), file_format="array_record").download_and_prepare()
    (root / "toy" / "0.9.0").mkdir()  # an older version: the newest is used
    return str(root)


def _tfds_cfg(data_dir, **kw):
    return ml_collections.ConfigDict(dict(dict(name="tfds", dataset="toy", data_dir=data_dir, image_size=SIZE,
                                               num_workers=0, normalization="clip"), **kw))


def test_tfds_array_record_source_reads_splits_labels_and_skips_corrupt_records(tfds_dir):
    train = data_lib.image_source(_tfds_cfg(tfds_dir), "maskembed", seed=0)
    assert len(train) == 9 and train.directory.endswith(os.path.join("toy", "1.0.0"))
    with pytest.warns(CorruptImageWarning, match=r"toy-train\.array_record-00000-of-00001 record \d"):
        b = train.batch(0, 9)  # one epoch
    assert b["image"].shape == (9, SIZE, SIZE, 3) and train.num_skipped == 1
    # Each record keeps the label it was written with; label 7's image is corrupt and was replaced.
    labels = [train.load(i)[1] for i in range(9)]
    assert sorted(labels) == list(range(9))
    for row, g in enumerate(range(9)):
        if labels[train.example_id(g)] != 7:
            assert b["label"][row] == labels[train.example_id(g)]
    assert set(b["label"].tolist()) - {7} == {0, 1, 2, 3, 4, 5, 6, 8}
    val = data_lib.image_source(_tfds_cfg(tfds_dir), "maskembed_val", seed=0)
    assert sorted(val.batch(0, 3)["label"].tolist()) == [9, 10, 11]
    # Host shards concatenate to the global batch, as for image folders.
    parts = [_quiet(train, 1, 6, (i, 2)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), _quiet(train, 1, 6)["image"])


def test_tfds_records_are_the_ones_tfds_reads(tfds_dir):
    """The source's images and labels are TFDS' own records (tfds.data_source), split for split, and each label
    comes with the image it was written with."""
    import tensorflow_datasets as tfds

    written = {}
    for split, spec in (("maskembed", "train"), ("maskembed_val", "validation")):
        src = data_lib.image_source(_tfds_cfg(tfds_dir), split)
        theirs = tfds.data_source("toy", data_dir=tfds_dir, split=spec,
                                  decoders={"image": tfds.decode.SkipDecoding()})
        assert len(src) == len(theirs)
        for i in range(len(src)):
            data, label = src.load(i)
            assert (data, label) == (theirs[i]["image"], theirs[i]["label"])
            written[label] = data
    assert sorted(written) == list(range(12)) and written[7] == b"corrupt bytes"
    assert Image.open(io.BytesIO(written[3])).size == (29, 27)  # png(20 + 3 * j, 30 - j), j = 3


def test_tfds_uint8_batches_are_the_old_pixels_and_the_device_normalizes_them_as_the_host_did(tfds_dir):
    _check_uint8_against_old(data_lib.image_source(_tfds_cfg(tfds_dir), "maskembed", seed=1), (0, 1, 2), 4, "clip")
    _check_uint8_against_old(data_lib.image_source(_tfds_cfg(tfds_dir), "maskembed_val", seed=1), (0,), 3, "clip")


def test_tfds_split_slices_and_explicit_path(tfds_dir):
    """TFDS' split strings, read as TFDS reads them: the same records, in order."""
    import tensorflow_datasets as tfds

    path = os.path.join(tfds_dir, "toy", "1.0.0")
    full = data_lib.image_source(_tfds_cfg("", path=path), "maskembed")
    for spec, first, count in (("train[:4]", 0, 4), ("train[-3:]", 6, 3), ("train[:34%]", 0, 3),
                               ("train[10%:60%]", 1, 4)):
        part = data_lib.image_source(_tfds_cfg("", path=path, val_split=spec), "maskembed_val")
        assert len(part) == count == len(tfds.data_source("toy", data_dir=tfds_dir, split=spec)), spec
        assert [part.load(i) for i in range(count)] == [full.load(first + i) for i in range(count)], spec
    both = data_lib.image_source(_tfds_cfg(tfds_dir, train_split="train+validation"), "maskembed")
    assert len(both) == 12


def test_tfds_bad_inputs_are_clear_errors(tfds_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="No TFDS dataset 'nope' under"):
        data_lib.image_source(_tfds_cfg(tfds_dir, dataset="nope"), "maskembed")
    with pytest.raises(FileNotFoundError, match=r"No TFDS dataset 'toy:2\.0\.0' under"):
        data_lib.image_source(_tfds_cfg(tfds_dir, version="2.0.0"), "maskembed")
    with pytest.raises(ValueError, match=r"config.data.train_split 'test' of .*Unknown split 'test'"):
        data_lib.image_source(_tfds_cfg(tfds_dir, train_split="test"), "maskembed")
    with pytest.raises(ValueError, match=r"config.data.val_split 'train\[::2\]' of .*Error parsing split"):
        data_lib.image_source(_tfds_cfg(tfds_dir, val_split="train[::2]"), "maskembed_val")
    with pytest.raises(FileNotFoundError, match="config.data.path: TFDS dataset directory"):
        data_lib.image_source(_tfds_cfg("", path=str(tmp_path / "none")), "maskembed")
    with pytest.raises(ValueError, match="needs `path`"):
        data_lib.image_source(_tfds_cfg(""), "maskembed")


def test_tfds_tfrecord_data_is_refused(tfds_dir, tmp_path):
    """A TFRecord data set (TFDS' default format) needs TensorFlow: refused, saying how to convert."""
    import json
    import shutil

    copy = tmp_path / "rec" / "toy" / "1.0.0"
    shutil.copytree(os.path.join(tfds_dir, "toy", "1.0.0"), copy)
    info = json.loads((copy / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (copy / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"as tfrecord files, which need TensorFlow.*--file_format=array_record"):
        data_lib.image_source(_tfds_cfg(str(tmp_path / "rec")), "maskembed")


@pytest.fixture
def fake_gcs(monkeypatch):
    """gs:// served by an in-memory fsspec filesystem (what gcsfs provides on a TPU VM): the same etils.epath and
    fsspec code path as a real bucket, without network."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store, pseudo_dirs = {}, [""]

    for name in ("gs", "gcs"):  # etils asks fsspec for "gcs"
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    yield FakeGCS
    FakeGCS.store.clear()


def _upload(local_root: str, url: str) -> None:
    from etils import epath

    for dirpath, _, files in os.walk(local_root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), local_root)
            with open(os.path.join(dirpath, name), "rb") as f:
                epath.Path(f"{url}/{rel}").write_bytes(f.read())


def test_gcs_image_folder_reads_the_same_batches_as_the_local_copy(folders, fake_gcs):
    train, val = folders
    _upload(train, "gs://bucket/in21k/train")
    _upload(val, "gs://bucket/in21k/val")
    listing = "gs://bucket/in21k/files.txt"
    for split in ("maskembed", "maskembed_val"):
        local = data_lib.image_source(_cfg(train, val_path=val), split, seed=3)
        remote = data_lib.image_source(_cfg("gs://bucket/in21k/train/", val_path="gs://bucket/in21k/val",
                                            file_list=listing), split, seed=3)
        a, b = _quiet(local, 1, 4), _quiet(remote, 1, 4)
        remote.close(), local.close()  # their prefetch threads read ahead; stop them before comparing counts
        assert remote.num_skipped == local.num_skipped  # only the broken JPEG, in both
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    from etils import epath

    assert len(epath.Path(listing).read_text().split()) == len(local_images := data_lib.image_folder.list_images(
        train)) and local_images == data_lib.image_folder.list_images("gs://bucket/in21k/train")
    with pytest.raises(FileNotFoundError, match="gs://bucket/nope"):
        data_lib.image_source(_cfg("gs://bucket/nope"), "maskembed")


# ------------------------------------------------------------------------------------ the reference's crop
def _timm_transforms(monkeypatch):
    """timm.data.transforms, its torchvision calls answered for PIL images the way torchvision's PIL backend does
    (resize = PIL resize, pad = numpy pad, crop = PIL crop), so that timm's own geometry runs without torchvision."""
    pytest.importorskip("torch")
    tt = pytest.importorskip("timm.data.transforms")
    F = tt.F
    monkeypatch.setattr(F, "get_dimensions", lambda im: [len(im.getbands()), im.height, im.width], raising=False)
    monkeypatch.setattr(F, "resize", lambda im, size, interp: im.resize(
        (size[1], size[0]), tt.str_to_pil_interp(tt.interp_mode_to_str(interp))), raising=False)

    def pad(im, ltrb, fill=0, padding_mode="constant"):
        l, t, r, b = ltrb
        return Image.fromarray(np.pad(np.asarray(im), ((t, b), (l, r), (0, 0)), mode=padding_mode))

    monkeypatch.setattr(F, "pad", pad, raising=False)
    monkeypatch.setattr(F, "crop", lambda im, top, left, h, w: im.crop((left, top, left + w, top + h)),
                        raising=False)
    return tt


class _Replay:
    """Stands in for Python's `random` inside timm: answers random() / uniform() with given draws, in order, and
    choice(seq) with seq[draw]."""

    def __init__(self, draws):
        self.draws = list(draws)

    def random(self):
        return self.draws.pop(0)

    def uniform(self, a, b):
        return self.draws.pop(0)

    def choice(self, seq):
        return seq[self.draws.pop(0)]


def test_rkrc_sizes_equal_timms_resize_keep_ratio_for_the_same_draws(monkeypatch):
    import math
    import random

    tt = _timm_transforms(monkeypatch)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    im = Image.new("RGB", (97, 61))
    for seed in range(200):
        random.seed(seed)
        theirs = tt.ResizeKeepRatio.get_params(im, (32, 32), 0.0, 0.5, scale, True, 0.5, ratio)
        random.seed(seed)  # the same draws, in timm's order
        zoom = random.uniform(*scale) if random.random() < 0.5 else None
        aspect = random.uniform(math.log(ratio[0]), math.log(ratio[1])) if random.random() < 0.5 else None
        w, h = images_lib.resize_keep_ratio_size(97, 61, 32, zoom, aspect)
        assert [h, w] == list(theirs), seed
    for w, h in ((20, 40), (31, 32), (40, 29), (32, 32)):  # centre crop, or reflect padding for a short side
        pad, left, top = images_lib.center_crop_or_pad_plan(w, h, 32)
        calls = {}
        # (the lambdas run inside this iteration: B023's late binding cannot bite)
        monkeypatch.setattr(tt.F, "pad", lambda im, ltrb, **kw: calls.setdefault("pad", ltrb) and im.resize(  # noqa: B023
            (im.width + ltrb[0] + ltrb[2], im.height + ltrb[1] + ltrb[3])), raising=False)
        monkeypatch.setattr(tt.F, "crop", lambda im, t, l, hh, ww: calls.setdefault("crop", (l, t)) and im,  # noqa: B023
                            raising=False)
        tt.center_crop_or_pad(Image.new("RGB", (w, h)), 32, padding_mode="reflect")
        assert tuple(calls.get("pad", (0, 0, 0, 0))) == pad and calls.get("crop", (0, 0)) == (left, top)


@pytest.mark.parametrize("interpolation", ["random", "bicubic", "bilinear"])
def test_rkrc_pixels_equal_timms_transform(monkeypatch, interpolation):
    """Same draws -> timm's ResizeKeepRatio(interpolation) + CenterCropOrPad(reflect) and lalign's crop give the
    same pixels, zoomed in, and padded: within a grey level, rarely two (lalign resizes only the region it shows,
    and PIL rounds to 8 bits between its horizontal and vertical passes; seen with bilinear). 'random':
    timm's random.choice is answered with the filter lalign drew for that row, and the other filter is seen to
    differ, so the match shows lalign resized with the filter it drew."""
    import io

    tt = _timm_transforms(monkeypatch)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:45, :70]
    pixels = np.stack([128 + 100 * np.sin(x / 5), 128 + 100 * np.cos(y / 4), (x * y) % 256], -1)
    pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    opts = dict(images_lib.COMMON_OPTIONS, flip=False, train_interpolation=interpolation)

    def timm(replay, interp):
        monkeypatch.setattr(tt, "random", _Replay(replay))
        resized = tt.ResizeKeepRatio(32, interpolation=interp, random_scale_prob=0.5, random_scale_range=(0.08, 1.0),
                                     random_scale_area=True, random_aspect_prob=0.5,
                                     random_aspect_range=(3 / 4, 4 / 3))(Image.fromarray(pixels))
        return resized, np.asarray(tt.center_crop_or_pad(resized, 32, padding_mode="reflect")).astype(int)

    checked, filters = set(), set()
    for seed in range(40):
        draws = np.random.default_rng(seed)
        p1 = draws.random()
        zoom = draws.uniform(0.08, 1.0) if p1 < 0.5 else None
        p2 = draws.random()
        aspect = draws.uniform(np.log(3 / 4), np.log(4 / 3)) if p2 < 0.5 else None
        # timm draws the filter after the size: index into (bilinear, bicubic), as lalign's row generator does
        choice = [int(draws.integers(2))] if interpolation == "random" else []
        ours = images_lib.decode_and_crop(buf.getvalue(), 32, True, np.random.default_rng(seed), opts).astype(int)
        replay = [p1] + ([zoom] if zoom is not None else []) + [p2] + ([aspect] if aspect is not None else [])
        resized, theirs = timm(replay + choice, interpolation)
        assert ours.shape == theirs.shape == (32, 32, 3)
        diff = np.abs(ours - theirs)
        assert diff.max() <= 2 and (diff > 1).sum() <= 3, seed
        checked.add("zoom" if zoom is not None else "pad" if min(resized.size) < 32 else "plain")
        if interpolation == "random":
            filters.add(images_lib.RANDOM_INTERPOLATIONS[choice[0]])
            _, other = timm(replay + [1 - choice[0]], "random")
            if resized.size != (70, 45):  # at the source's own size both filters copy the pixels
                assert np.abs(ours - other).max() > 8, seed
    assert {"zoom", "pad"} <= checked
    assert filters == ({"bilinear", "bicubic"} if interpolation == "random" else set())


def test_rkrc_size_distribution_matches_timms():
    """Over many draws, lalign's generator gives the distribution of output sizes timm's does."""
    import random

    pytest.importorskip("torch")
    tt = pytest.importorskip("timm.data.transforms")

    class Square:  # get_params reads only the size
        pass

    random.seed(0)
    n = 4000
    rng = np.random.default_rng(0)
    ours = np.array([images_lib.draw_resize_keep_ratio(rng, 100, 100, 32, (0.08, 1.0), (3 / 4, 4 / 3))
                     for _ in range(n)], float)
    original = tt.F.get_dimensions if "get_dimensions" in vars(tt.F) else None
    try:
        tt.F.get_dimensions = lambda _: [3, 100, 100]
        theirs = np.array([tt.ResizeKeepRatio.get_params(Square(), (32, 32), 0.0, 0.5, (0.08, 1.0), True, 0.5,
                                                         (3 / 4, 4 / 3))[::-1] for _ in range(n)], float)
    finally:
        if original is None:
            del tt.F.get_dimensions
        else:
            tt.F.get_dimensions = original
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(ours, q, axis=0) - np.quantile(theirs, q, axis=0)).max() <= 2, q
    # a quarter draw neither zoom nor aspect change, and a few more round back to the output size
    unchanged = lambda s: np.mean((s[:, 0] == 32) & (s[:, 1] == 32))  # noqa: E731
    assert abs(unchanged(ours) - unchanged(theirs)) < 0.03 and 0.25 <= unchanged(ours) < 0.32


def test_probe_features_normalize_uint8_on_the_device_as_the_host_did():
    """The probe's feature extractor takes uint8 images with their normalization (as the training step does) and
    gives the tokens of the same images normalized on the host; float images pass unchanged."""
    import jax

    from lalign.data.probe_splits import array_split
    from lalign.models.vit import make_vit
    from lalign.probe.features import extract_split, make_features_fn

    vit = make_vit(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, pool_type="map")
    pixels = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    params = vit.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))["params"]
    on_device = make_features_fn(vit, params, normalization="imagenet")
    host = _old_normalize(pixels, "imagenet")
    np.testing.assert_allclose(np.asarray(on_device(pixels)), np.asarray(on_device(host)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8 images need a normalization"):
        make_features_fn(vit, params)(pixels)
    split = array_split("test", "toy", {"image": pixels, "patch_labels": np.zeros((3, 16, 2), np.uint8),
                                        "labels": np.zeros((3, 2), np.uint8)})
    got = extract_split(on_device, split, 16, 16, batch_size=2)["features"]  # a padded last batch
    np.testing.assert_allclose(got, np.asarray(on_device(host)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ golden batches
def _digest(batch) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in ("image", "label", "index"):
        h.update(np.ascontiguousarray(batch[key]).tobytes())
    return h.hexdigest()[:16]


# sha256 (first 16 hex digits) of image, label and index of batches as the sources built them before the grain
# pipeline: the order, the crops and the corrupt-image replacements of a step must stay bit-identical.
GOLDEN = {  # Pillow 13.0's PNG/JPEG codecs write the test images; tfds: the hand-written reader's batches
    "folder-rkrc-0": "5ad68abcfbe9219f",
    "folder-rkrc-1": "8a7f665540e1fc85",
    "folder-rkrc-5": "b2094cbc8daae5ab",
    "folder-rkrc-3-host2of4": "531c845799b9fd06",
    "folder-rrc-0": "2af1e9f1154deca7",
    "folder-rrc-1": "550aee0903e81031",
    "folder-rrc-5": "87657d40035cc813",
    "folder-rrc-3-host2of4": "abc3c441473f2e1d",
    "folder-val-0": "0115381a300d797d",
    "folder-val-1": "315f4330c58a1381",
    "tfds-0": "beaaad6c78d3d11b",
    "tfds-1": "a70e9256d463987e",
    "tfds-2": "32338f7c2ffb72eb",
    "tfds-val-0": "a4aeb4d51d8abec7",
}


def _golden_batches(folders, tfds_dir):
    train, val = folders
    out = {}
    for mode in ("rkrc", "rrc"):
        src = data_lib.image_source(_cfg(train, val_path=val, train_crop_mode=mode), "maskembed", seed=3)
        for step in (0, 1, 5):
            out[f"folder-{mode}-{step}"] = _digest(_quiet(src, step, 4))
        out[f"folder-{mode}-3-host2of4"] = _digest(_quiet(src, 3, 8, (2, 4)))
    src = data_lib.image_source(_cfg(train, val_path=val), "maskembed_val", seed=3)
    for step in (0, 1):
        out[f"folder-val-{step}"] = _digest(src.batch(step, 3))
    src = data_lib.image_source(_tfds_cfg(tfds_dir), "maskembed", seed=1)
    for step in (0, 1, 2):
        out[f"tfds-{step}"] = _digest(_quiet(src, step, 4))
    out["tfds-val-0"] = _digest(data_lib.image_source(_tfds_cfg(tfds_dir), "maskembed_val", seed=1).batch(0, 3))
    return out


def test_batches_are_bit_identical_to_the_golden_ones(folders, tfds_dir):
    got = _golden_batches(folders, tfds_dir)
    assert got == GOLDEN


def test_worker_processes_build_the_same_batches_and_report_their_skips(folders, tfds_dir):
    """num_workers=2: grain's worker processes build the look-ahead; the batches are the golden ones, and the
    corrupt image a worker met is counted and named here."""
    src = data_lib.image_source(_tfds_cfg(tfds_dir, num_workers=2), "maskembed", seed=1)
    try:
        assert [_digest(_quiet(src, step, 4)) for step in range(3)] == [GOLDEN[f"tfds-{i}"] for i in range(3)]
    finally:
        src.close()
    train, val = folders
    src = data_lib.image_source(_cfg(train, val_path=val, num_workers=2, prefetch=3), "maskembed", seed=3)
    try:
        with pytest.warns(CorruptImageWarning, match=r"dog/broken\.jpg"):
            got = [_digest(src.batch(step, 4)) for step in range(6)]  # sequential: from the look-ahead
    finally:
        src.close()
    assert got[0] == GOLDEN["folder-rkrc-0"] and got[1] == GOLDEN["folder-rkrc-1"]
    assert got[5] == GOLDEN["folder-rkrc-5"]
    assert src.num_skipped == 1 and src.num_read >= 24
