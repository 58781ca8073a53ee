"""big_vision npz checkpoints: load and save ViT params with big_vision's flat '/'-joined keys.

Accepted files (what big_vision writes and Google releases):

* a ViT params npz: `embedding/kernel`, `Transformer/encoderblock_{i}/...` (per-block layout) or
  `Transformer/encoderblock/...` (scanned layout: every block leaf stacked on a leading depth axis);
* the same under a `params/` prefix (a training checkpoint; other groups such as `opt/` are ignored);
* a two-tower SigLIP / LiT npz (`params/img/...`, `params/txt/...`, `params/t`, `params/b`): the image tower
  (`tower='img'`) is returned.

bfloat16 leaves are stored by numpy as 2-byte void (`|V2`) and are viewed back as `ml_dtypes.bfloat16`. Files are
read with `allow_pickle=False`. `save_npz` writes the same format (atomically: a failed save never leaves a
half-written file behind).

    params = load_npz("siglip_b16_224.npz")                    # layout as stored
    params = load_npz(path, like=model_params)                 # converted to like's layout, shapes checked
    save_npz("out.npz", params)                                 # layout as given; scan_to_blocks/blocks_to_scan
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np

from lalign.files import write_atomically
from lalign.checkpoints.common import (blocks_to_scan, check_shapes, flatten, infer_model, is_scanned,  # noqa: F401
                                       scan_to_blocks, to_layout, to_numpy, unflatten)

__all__ = ["load_npz", "save_npz", "read_npz_flat", "scan_to_blocks", "blocks_to_scan", "infer_model"]


def _fix_dtype(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "V" and a.dtype.itemsize == 2 and a.dtype.names is None:
        return a.view(ml_dtypes.bfloat16)
    return a


def read_npz_flat(path: str) -> dict[str, np.ndarray]:
    """All arrays of an npz file by key (bfloat16 restored), with a clear error for unreadable files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No npz checkpoint at {path}.")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError(f"{path} is a single .npy array, not an npz archive of named arrays.")
            return {k: _fix_dtype(f[k]) for k in f.files}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable npz archive: {e}") from e
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise ValueError(f"{path} holds pickled (object) arrays, which are not loaded for safety; a big_vision "
                             f"checkpoint has only numeric arrays.") from e
        raise


def _select_vit(flat: Mapping[str, np.ndarray], path: str, tower: str) -> dict[str, np.ndarray]:
    """Strips `params/` and picks the image tower of a two-tower file."""
    keys = list(flat)
    for prefix in (f"params/{tower}/", f"{tower}/", "params/", ""):
        sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if "embedding/kernel" in sub:
            return sub
    towers = sorted({k.split("/")[1] for k in keys if k.startswith("params/") and k.count("/") > 1})
    hint = f" Two-tower groups found: {towers}; pass tower=one of them." if towers else ""
    raise ValueError(f"{path}: not a big_vision ViT checkpoint: no 'embedding/kernel' under '', 'params/' or "
                     f"'params/{tower}/'.{hint} First keys: {sorted(keys)[:8]}")


def load_npz(path: str, like: Optional[Mapping] = None, *, tower: str = "img", scan: Optional[bool] = None,
             dtype: Any = None) -> dict:
    """Loads big_vision ViT params (nested dict of numpy arrays) from an npz file.

    like: params (or shapes) of the model they are for; the result is converted to its layout and every key and
      shape is checked (ValueError naming the file, key, expected and actual shape).
    tower: which tower of a two-tower (SigLIP/LiT) file, default the image tower 'img'.
    scan: force a layout (True: scanned, False: per-block); default: like's layout, else as stored.
    dtype: cast every leaf (e.g. np.float32); default keeps the stored dtype (bfloat16 stays bfloat16).
    """
    flat = _select_vit(read_npz_flat(path), os.fspath(path), tower)
    if dtype is not None:
        flat = {k: v.astype(dtype) for k, v in flat.items()}
    params = unflatten(flat)
    if "Transformer" not in params:
        raise ValueError(f"{path}: not a big_vision ViT checkpoint: no 'Transformer/...' keys.")
    if like is not None and scan is None:
        scan = is_scanned(like)
    if scan is not None:
        params = to_layout(params, scan)
    if like is not None:
        check_shapes(params, like, source=os.fspath(path), what="the expected params")
    return params


def save_npz(path: str, params: Mapping, *, scan: Optional[bool] = None) -> None:
    """Writes params with big_vision's flat '/'-joined keys (np.savez, uncompressed, like big_vision).

    scan: convert to the scanned (True) or per-block (False) layout first; default: as given.
    """
    path = os.fspath(path)
    params = to_numpy(params)
    if scan is not None:
        params = to_layout(params, scan)
    flat = flatten(params)
    for k, v in flat.items():
        if v.dtype == object:
            raise ValueError(f"Cannot save {k!r}: object arrays are not allowed in an npz checkpoint.")
    write_atomically(path, lambda tmp: np.savez(tmp, **flat), ".npz")
