"""Tiny segmentation data sets the tests write themselves, in the real layouts (COCO-Stuff, generic folders)."""
import os

import numpy as np
from PIL import Image

# A few real COCO-Stuff ids (stuffthingmaps values): person, car, banner, grass, sky-other, wood.
CLASSES = (0, 2, 91, 123, 156, 181)
COLOURS = {0: (230, 40, 40), 2: (40, 40, 230), 91: (240, 240, 40), 123: (40, 200, 60), 156: (120, 200, 250),
           181: (150, 90, 40)}


def scene(rng, height=32, width=48):
    """(image uint8 (H, W, 3), label map uint8 (H, W)): left and right halves of two classes, an unlabeled (255)
    top band; the image paints each class in its colour (plus noise) so a probe can learn it."""
    a, b = rng.choice(CLASSES, 2, replace=False)
    labels = np.full((height, width), a, np.uint8)
    labels[:, width // 2:] = b
    labels[:4] = 255
    image = np.zeros((height, width, 3), np.float32)
    for c in (a, b):
        image[labels == c] = COLOURS[int(c)]
    image[labels == 255] = 128
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def write_pair(image_dir, label_dir, stem, image, labels, ext=".jpg"):
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    Image.fromarray(image).save(os.path.join(image_dir, stem + ext), quality=95)
    Image.fromarray(labels, mode="L").save(os.path.join(label_dir, stem + ".png"))


def write_coco_stuff(root, num_train=12, num_val=6, seed=0, corrupt=()):
    """ROOT/images/{train2017,val2017}/*.jpg + ROOT/stuffthingmaps/{train2017,val2017}/*.png. `corrupt`: stems
    (of train2017) whose JPEG is replaced by garbage bytes. Returns {split: [stems]}."""
    rng = np.random.default_rng(seed)
    stems = {}
    for split, n in (("train2017", num_train), ("val2017", num_val)):
        stems[split] = []
        for i in range(n):
            stem = f"{(1 if split == 'train2017' else 500000) + i:012d}"
            image, labels = scene(rng)
            write_pair(os.path.join(root, "images", split), os.path.join(root, "stuffthingmaps", split), stem,
                       image, labels)
            stems[split].append(stem)
    for stem in corrupt:
        with open(os.path.join(root, "images", "train2017", stem + ".jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return stems


def write_ade20k(root, num_train=8, num_val=4, seed=0):
    """ROOT/images/{training,validation}/ADE_*.jpg + ROOT/annotations/{training,validation}/ADE_*.png (the
    ADEChallengeData2016 layout): PNG value 0 = "other" on a top band, 1 (wall) on the left half, 150 (flag) on
    the right half. Returns {split: [stems]}."""
    rng = np.random.default_rng(seed)
    stems = {}
    for split, tag, n in (("training", "train", num_train), ("validation", "val", num_val)):
        stems[split] = []
        for i in range(n):
            labels = np.full((32, 48), 1, np.uint8)
            labels[:, 24:] = 150
            labels[:4] = 0
            image = np.where((labels == 1)[..., None], 60, 200).astype(np.float32) + rng.normal(0, 8, (32, 48, 3))
            stem = f"ADE_{tag}_{i + 1:08d}"
            write_pair(os.path.join(root, "images", split), os.path.join(root, "annotations", split), stem,
                       np.clip(image, 0, 255).astype(np.uint8), labels)
            stems[split].append(stem)
    return stems
