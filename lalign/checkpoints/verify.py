"""Checksums of a checkpointed pytree: recorded when it is saved, checked when it is read back.

Orbax restores whatever bytes are on disk: a flipped block in an array file (a bad disk, a torn copy, a bucket
object replaced) comes back as a plausible array with a few absurd values, and training or export goes on with
it. So every save records, per array, two checksums of its raw bits and whether it is finite, in a small JSON
file beside the checkpoint (`checkpoints/checksums/<latest|best>/<step>.json`); a restore recomputes them and a
step whose arrays disagree is reported, array by array, and not used.

The checksums are sums of the array's bits as uint32, plain and weighted by position (1-based, row-major),
modulo 2**32: exact integer arithmetic, so they do not depend on how the array is sharded (a checkpoint saved on
one mesh verifies on another), on device they cost one pass over the state, and numpy computes the same numbers
on a host (`lalign.export`).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from lalign import files
from lalign.sharding import path_str

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}

# Written into each training step's own orbax metadata (`_CHECKPOINT_METADATA`, beside the arrays): a step that
# carries it was saved with a checksum record, so a missing record is damage; a step without it was saved by an
# lalign from before checksums, and only such a step is restored unverified.
STEP_METADATA = {"lalign_checksums": 1}


def _device_sums(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    bits = x.astype(jnp.uint32) if x.dtype == jnp.bool_ else \
        jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    weights = jnp.arange(1, x.size + 1, dtype=jnp.uint32).reshape(x.shape)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32),
                      finite.astype(jnp.uint32)])


@functools.lru_cache(maxsize=8)
def _record_fn(out_sharding):
    """One jitted function per output sharding (jit then caches one program per state structure): a save does
    not compile again."""
    return jax.jit(lambda xs: jnp.stack([_device_sums(x) for x in xs]), out_shardings=out_sharding)


def device_record(tree, out_sharding=None) -> dict[str, dict]:
    """{path: {'sums': [plain, weighted], 'finite': bool, 'shape', 'dtype'}} of a pytree of (sharded) arrays:
    one jitted pass and one transfer of 3 numbers per array."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    table = np.asarray(jax.device_get(_record_fn(out_sharding)([x for _, x in leaves])))
    return {path_str(p): {"sums": [int(a), int(b)], "finite": bool(f), "shape": list(np.shape(x)),
                          "dtype": str(x.dtype)} for (p, x), (a, b, f) in zip(leaves, table)}


def host_record(tree) -> dict[str, dict]:
    """`device_record` computed with numpy, for arrays read into host memory."""
    out = {}
    for p, x in jax.tree_util.tree_leaves_with_path(tree):
        x = np.asarray(x)
        bits = x.astype(np.uint32) if x.dtype == np.bool_ else x.view(_UINT[x.dtype.itemsize]).astype(np.uint32)
        weights = np.arange(1, x.size + 1, dtype=np.uint32).reshape(x.shape)
        finite = bool(np.all(np.isfinite(x))) if np.issubdtype(x.dtype, np.inexact) or "bfloat16" in str(x.dtype) \
            else True
        out[path_str(p)] = {"sums": [int(np.sum(bits, dtype=np.uint32)), int(np.sum(bits * weights, dtype=np.uint32))],
                            "finite": finite, "shape": list(x.shape), "dtype": str(x.dtype)}
    return out


def not_finite(record: dict) -> list[str]:
    return [k for k, v in record.items() if not v["finite"]]


def mismatches(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences, one per array: missing, extra, other shape, other bits."""
    out = [f"{k}: missing" for k in expected if k not in actual]
    out += [f"{k}: not in the record" for k in actual if k not in expected]
    for k in expected:
        if k in actual:
            e, a = expected[k], actual[k]
            if e["shape"] != a["shape"]:
                out.append(f"{k}: shape {tuple(a['shape'])}, recorded {tuple(e['shape'])}")
            elif e["sums"] != a["sums"]:
                out.append(f"{k} {tuple(a['shape'])}: its bytes differ from what was saved (checksums {a['sums']}, "
                           f"recorded {e['sums']})")
    return out


def record_path(checkpoints_dir: str, kind: str, step: int) -> str:
    return os.path.join(checkpoints_dir, "checksums", kind, f"{int(step)}.json")


def write(path: str, step: int, record: dict) -> None:
    """Written atomically (a temporary name, then a rename): by process 0 of a multi-host run."""
    if jax.process_index() != 0:
        return
    files.write_text(path, json.dumps({"step": int(step), "arrays": record}))


class RecordError(ValueError):
    """A checksum record that exists but cannot be read (torn, truncated, not a record): nothing to verify
    against, so the step it describes fails verification."""


def read(path: str) -> Optional[dict]:
    """The arrays a record lists; None where there is no record; RecordError, naming the file, where it cannot be
    read."""
    p = epath.Path(path)
    if not p.exists():
        return None
    try:
        arrays = json.loads(p.read_text())["arrays"]
        if not isinstance(arrays, dict):
            raise TypeError(f"'arrays' is a {type(arrays).__name__}, expected an object")
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RecordError(f"its checksum record {path} cannot be read ({type(e).__name__}: {e})") from None
    return arrays


def for_step_dir(step_dir: str) -> Optional[str]:
    """The record of a checkpoint step directory `.../checkpoints/<latest|best>/<step>[/default]`, or of a
    quarantined step `.../checkpoints/quarantine/<name>` (its `checksums.json`), if any."""
    d = files.absolute(step_dir).rstrip("/")
    if os.path.basename(d) == "default":
        d = os.path.dirname(d)
    step, kind, root = os.path.basename(d), os.path.basename(os.path.dirname(d)), os.path.dirname(os.path.dirname(d))
    if kind == "quarantine":
        path = os.path.join(d, "checksums.json")
        return path if os.path.exists(path) else None
    if not step.isdigit() or kind not in ("latest", "best"):
        return None
    path = record_path(root, kind, int(step))
    return path if os.path.exists(path) else None


def saved_with_record(step_dir: str) -> bool:
    """Whether the checkpoint step at `step_dir` (a CheckpointManager step: `latest/17`) says in its orbax metadata
    that it was saved with a checksum record (`STEP_METADATA`). No metadata file (an older lalign, or not a training
    step): no. Metadata that cannot be read does not say it was not: yes (the resuming run and export agree)."""
    meta = epath.Path(step_dir) / "_CHECKPOINT_METADATA"
    try:
        if not meta.exists():
            return False
        custom = json.loads(meta.read_text()).get("custom_metadata") or {}
    except (OSError, ValueError, AttributeError):  # unreadable or not a JSON object: not known to be older
        return True
    return all(custom.get(k) == v for k, v in STEP_METADATA.items())
