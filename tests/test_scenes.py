"""The embedded scenes: crop-and-resize, the teacher's random-crop augmentation and its labels."""
import hashlib

import jax
import numpy as np

from lalign.data import scenes
from lalign.pretrain import pretrain_teacher


def test_crop_resize_of_the_whole_image_at_its_size_is_the_identity():
    img = np.random.default_rng(0).normal(size=(12, 12, 3)).astype(np.float32)
    np.testing.assert_array_equal(scenes.crop_resize(img, (0, 0, 12, 12), 12), img)
    # A 2x upsampling of the left half of a ramp stays monotone and within the half's values.
    ramp = np.tile(np.arange(12, dtype=np.float32), (12, 1))
    out = scenes.crop_resize(ramp, (0, 0, 6, 12), 12)
    assert out.shape == (12, 12) and np.all(np.diff(out[0]) >= 0) and out.max() <= 6.0


def test_scenes_are_the_ones_the_documented_demo_results_were_measured_on():
    """Pins scenes 100-105 of two splits, as rendered when docs/results.md was measured. The renderer caches
    what scenes share (lalign/data/scenes.py); a change that alters any scene fails here. Labels, patch labels
    and segmentations are exact; image sums get a tolerance (the background's float64 `sin` may differ in the
    last bit between CPUs)."""
    expected = {"maskembed": ("2741cc2e0849075c", [-2662.667, -2070.852, -4128.03, -1042.956, -1231.113, -3409.345]),
                "probe_test": ("bcea8200ccbde213", [-2398.428, -2852.074, 154.346, -3469.548, -123.939, -1605.23])}
    for split, (digest, image_sums) in expected.items():
        ex = scenes.Scenes(scenes.SceneSpec(), split, seed=0).examples(100, 6)
        exact = b"".join(ex[k].tobytes() for k in ("labels", "patch_labels", "segmentation"))
        assert hashlib.sha256(exact).hexdigest()[:16] == digest, split
        np.testing.assert_allclose(ex["image"].sum(axis=(1, 2, 3)), image_sums, rtol=1e-5, atol=0.01, err_msg=split)


def test_changing_a_rendered_batch_in_place_does_not_change_later_renders():
    stream = scenes.Scenes(scenes.SceneSpec(), "pretrain", seed=3)
    first = stream.examples(0, 4)
    again = {k: v.copy() for k, v in first.items()}
    for v in first.values():
        v[...] = 7  # a caller (augmentation, normalization) may write into what it got
    _, _, objects = scenes.make_scene(np.random.default_rng([3, scenes.SPLITS["pretrain"], 0]),
                                      scenes.SceneSpec(), "train")
    for _, alpha in objects:
        alpha[...] = 7
    for k, v in stream.examples(0, 4).items():
        np.testing.assert_array_equal(v, again[k], err_msg=k)


def _two_corner_objects(size=32):
    """A scene batch by hand: class 0 fills the top-left 8x8, class 2 the bottom-right 8x8; channel 0 of the
    image is the pixel's column, channel 1 its row (so a crop's position can be read back from its pixels)."""
    seg = np.zeros((size, size), np.int32)
    seg[:8, :8] = 1
    seg[-8:, -8:] = 3
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    image = np.stack([cols, rows, np.zeros_like(rows)], -1)
    labels = np.zeros(10, np.float32)
    labels[[0, 2]] = 1
    return {"image": image[None], "labels": labels[None], "segmentation": seg[None]}


def test_a_crop_of_everything_keeps_image_and_labels():
    batch = _two_corner_objects()
    out = scenes.random_crop(batch, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(out["image"], batch["image"])
    np.testing.assert_array_equal(out["labels"], batch["labels"])


def test_crop_labels_are_the_classes_with_half_their_pixels_inside():
    batch = _two_corner_objects()
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        out = scenes.random_crop(batch, rng, scale=(0.25, 0.25), ratio=(1.0, 1.0))  # 16x16 crops, upsampled 2x
        # The crop's top-left corner, read back from the pixel coordinates the image carries.
        left, top = (int(round(out["image"][0, 0, 0, c] + 0.25)) for c in (0, 1))
        inside_tl = max(0, 8 - left) * max(0, 8 - top)  # pixels of the 8x8 top-left object in the crop
        inside_br = max(0, left + 16 - 24) * max(0, top + 16 - 24)
        expected = np.zeros(10, np.float32)
        expected[0], expected[2] = inside_tl >= 32, inside_br >= 32
        np.testing.assert_array_equal(out["labels"][0], expected, err_msg=f"crop at ({left}, {top})")
        seen.add(tuple(expected[[0, 2]]))
    assert seen == {(0, 0), (1, 0), (0, 1)}  # both kinds of partial view were drawn; never both objects


def test_pretraining_on_crops_is_deterministic_and_uses_them(tiny_config, tmp_path):
    def teacher(crop, name):
        c = tiny_config.copy_and_resolve_references()
        c.pretrain.crop_scale = crop
        return pretrain_teacher(c, str(tmp_path / name))[1]

    a, b, plain = teacher((0.25, 1.0), "a"), teacher((0.25, 1.0), "b"), teacher((), "plain")
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(plain)))

