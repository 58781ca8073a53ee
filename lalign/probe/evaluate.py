"""One frozen backbone, evaluated: features of every split extracted once, the patch probe over its seeds (with
a progress line per epoch and an ETA), and optionally the image and background-token probes. The pipeline's probe
stage and `python -m lalign.probe` both go through `evaluate_backbone`."""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from lalign import config as config_lib
from lalign.data.probe_splits import ProbeSplit
from lalign.log import info
from lalign.metric_writer import format_duration
from lalign.probe.features import extract_split
from lalign.probe.heads import background_token_probe, image_linear_probe, probe_memory, train_patch_probe_seeds
from lalign.probe.metrics import degenerate_warning, summarize_runs


def extract_splits(features_fn: Callable, splits: dict[str, ProbeSplit], num_patches: int, width: int,
                   features_cfg=None, directory: str = "") -> tuple[dict, dict]:
    """({name: extracted}, {f'features_{name}_s': seconds}) for the 'train', 'val' and 'test' splits."""
    fcfg = config_lib.completed(features_cfg or {}, config_lib.PROBE_SCHEMA["features"])
    extracted, times = {}, {}
    for name, split in splits.items():
        t0 = time.time()
        extracted[name] = extract_split(features_fn, split, num_patches, width,
                                        batch_size=fcfg.batch_size, store=fcfg.store, dtype=fcfg.dtype,
                                        directory=os.path.join(directory, "features") if directory else "")
        times[f"features_{name}_s"] = time.time() - t0
        e = extracted[name]
        info(f"[probe] features {name}: {e['count']} images from {split.source} [{times[f'features_{name}_s']:.0f}s]"
             + (f", {len(e['skipped'])} skipped" if e["skipped"] else ""))
    return extracted, times


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_line(splits: dict[str, ProbeSplit], num_patches: int, width: int, num_heads: int, probe_cfg,
                features_cfg=None) -> str:
    """What the probe will hold: the feature store (in memory, or memmaps on disk read a piece at a time), the
    probe's parameters and optimizer state, and the larger of a training step's and an evaluation chunk's
    activations (`heads.probe_memory`)."""
    fcfg = config_lib.completed(features_cfg or {}, config_lib.PROBE_SCHEMA["features"])
    store, dtype = fcfg.store, np.dtype(fcfg.dtype)
    n = sum(s.size for s in splits.values())
    c = next(iter(splits.values())).num_classes
    feats = n * num_patches * width * dtype.itemsize
    labels = n * num_patches * c
    seeds = len(probe_cfg.seeds)
    m = probe_memory(num_patches, width, num_heads, c, probe_cfg, seeds, (splits["val"].size, splits["test"].size))
    in_ram = (feats + labels if store == "memory" else 0) + n * (4 * width + c) + m["state"]
    where = "in memory" if store == "memory" else "on disk (memmaps, read as needed)"
    return (f"[probe] memory: features {_bytes(feats)} + patch labels {_bytes(labels)} {where} ({n} images x "
            f"{num_patches} patches x {width} {dtype.name}); probe state {_bytes(m['state'])} ({seeds} seed(s)); "
            f"activations: training step {_bytes(m['step'])} (batch {probe_cfg.batch_size} x {seeds}), "
            f"evaluation {_bytes(m['eval'])} (chunk {m['chunk']}); about {_bytes(in_ram + max(m['step'], m['eval']))} "
            f"of memory in all (an estimate; XLA:CPU's temporaries run up to 1.7x the activations)")


def train_patch_probes(extracted: dict, cfg, num_heads: int, what: str = "probe") -> list[dict]:
    """The patch probe for every seed of `cfg.seeds` (trained side by side in one program), each epoch logged with
    validation recall and mIoU and an ETA."""
    data = {name: (e["features"], e["patch_labels"]) for name, e in extracted.items()}
    total, done, t0 = len(cfg.seeds) * cfg.epochs, 0, time.time()

    def log(seed, h):
        nonlocal done
        done += 1
        eta = (time.time() - t0) / done * (total - done)
        info(f"[{what}] seed {seed} epoch {h['epoch']}/{cfg.epochs} | loss {h['loss']:.4f} | val macro recall "
             f"{h['val_macro_recall']:.4f} | val mIoU {h['val_miou']:.4f} | ETA {format_duration(eta)}")

    return train_patch_probe_seeds(data["train"], data["val"], data["test"], cfg, cfg.seeds, num_heads, log)


def image_probes(extracted: dict) -> dict:
    """Image-level mAP of a linear probe on mean-pooled features, and of one background token per image."""
    image = image_linear_probe((extracted["train"]["pooled"], extracted["train"]["labels"]),
                               (extracted["test"]["pooled"], extracted["test"]["labels"]))
    image["background_token_map"] = background_token_probe(
        *[(extracted[n]["features"], extracted[n]["patch_labels"], extracted[n]["labels"]) for n in ("train", "test")])
    return image


def evaluate_backbone(features_fn: Callable, splits: dict[str, ProbeSplit], num_patches: int, width: int,
                      num_heads: int, probe_cfg, *, image_probe: bool = True, features_cfg=None,
                      directory: str = "", what: str = "probe") -> dict:
    """{'patch': summary over seeds, 'image': ... (with image_probe), 'extracted', 'runtime_s'} for one backbone."""
    info(memory_line(splits, num_patches, width, num_heads, probe_cfg, features_cfg))
    extracted, times = extract_splits(features_fn, splits, num_patches, width, features_cfg, directory)
    t0 = time.time()
    runs = train_patch_probes(extracted, probe_cfg, num_heads, what)
    times["probe_s"] = time.time() - t0
    out = {"patch": summarize_runs(runs), "extracted": extracted, "runtime_s": times}
    warning = degenerate_warning(out["patch"], what)
    if warning:  # in the log and in the results (results.json, the pipeline's probe/*.json)
        info(f"[{what}] {warning}")
        out["patch"]["warnings"] = [warning]
    if image_probe:
        t0 = time.time()
        out["image"] = image_probes(extracted)
        times["image_probe_s"] = time.time() - t0
    return out
