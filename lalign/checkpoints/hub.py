"""Checkpoints by name: Hugging Face hub ids and bucket folders, made local once before any format reads them.

    resolve("facebook/dinov2-base")                      # a hub model repo, its newest revision
    resolve("google/siglip-so400m-patch14-384@a1b2c3d")  # a pinned revision (branch, tag or commit)
    resolve("hf-hub:timm/vit_base_patch16_siglip_224.webli")  # timm's spelling: the repo's model.safetensors
    resolve("gs://bucket/teachers/siglip_b16")           # any fsspec URL (gs:// needs gcsfs): copied to a cache
    resolve("/data/siglip-base-patch16-224")             # a local path: as it is

Hub downloads go through `huggingface_hub` into its cache (HF_HOME / HF_HUB_CACHE), so a second run reads the cache
and `HF_HUB_OFFLINE=1` runs without the network from a filled cache. Only the files a ViT checkpoint needs are
fetched (configs, safetensors, the image processor). On a multi-host job process 0 resolves the revision and
downloads first; the other hosts then fetch that exact commit (from a shared cache if HF_HOME is shared, else once
each), so every host reads the same bytes. Bucket folders are copied into `~/.cache/lalign/remote/<hash>/` once
(a folder whose copy completed is not fetched again).

`Resolved.record()` is what a workdir keeps of the source: what was asked for, the local path, and the commit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from lalign import log

# What a ViT checkpoint needs of a hub repo: its configs, its weights, its image processor (normalization).
HUB_FILES = ("*.json", "*.safetensors", "*.npz", "*.txt")
# An `owner/name` repo id with an optional `@revision` (as the hub spells them).
_HUB_ID = re.compile(r"^(?:hf-hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A checkpoint made local: `path` is what the format readers take."""

    source: str  # what the config or the command line said
    path: str
    revision: Optional[str] = None  # the hub commit, where the source was a hub id

    def record(self) -> dict:
        return {"source": self.source, "path": self.path, "revision": self.revision}


def is_remote(spec: str) -> bool:
    """True for what `resolve` fetches: a hub id that names no local path, or a URL."""
    if not spec or os.path.exists(spec):
        return False
    return "://" in spec or spec.startswith("hf-hub:") or bool(_HUB_ID.match(spec))


def resolve(spec: str, *, cache_dir: Optional[str] = None, files=HUB_FILES) -> Resolved:
    """A local path for `spec` (module docstring); local paths come back unchanged. `files`: the hub files fetched
    (patterns; a VLM needs its tokenizer too)."""
    if not is_remote(spec):
        return Resolved(spec, spec)
    if "://" in spec:
        return Resolved(spec, _copy_url(spec, cache_dir))
    repo_id, revision = _HUB_ID.match(spec).groups()
    folder, commit = _hub_snapshot(repo_id, revision, spec, files)
    path = folder
    if spec.startswith("hf-hub:"):  # timm's hub repos: the state dict is the checkpoint, config.json is timm's
        path = os.path.join(folder, "model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{spec}: the hub repo {repo_id} has no model.safetensors (files: "
                                    f"{sorted(os.listdir(folder))}).")
    log.info(f"[hub] {spec} -> {path} (revision {commit})")
    return Resolved(spec, path, commit)


def _hub_snapshot(repo_id: str, revision: Optional[str], spec: str, files=HUB_FILES) -> tuple[str, str]:
    """(snapshot folder, commit) of a hub repo, process 0 first on a multi-host job."""
    try:
        import huggingface_hub  # optional: only a hub id needs it
    except ImportError as e:
        raise ImportError(f"{spec} names a Hugging Face hub repo: pip install huggingface_hub (or pass a local "
                          f"path).") from e

    def download(rev):
        try:
            return huggingface_hub.snapshot_download(repo_id, revision=rev, allow_patterns=list(files))
        except Exception as e:  # offline without the files, unknown repo, no network: one clear line
            offline = huggingface_hub.constants.HF_HUB_OFFLINE  # HF_HUB_OFFLINE, as huggingface_hub reads it
            hint = ("; HF_HUB_OFFLINE is set and the cache does not hold it" if offline else
                    "; without a network, set HF_HUB_OFFLINE=1 to read a filled cache")
            first = str(e).split(". ")[0].splitlines()[0] if str(e) else ""
            raise FileNotFoundError(f"{spec}: no such local path, and {repo_id}@{rev or 'main'} could not be had "
                                    f"from the Hugging Face hub ({type(e).__name__}: {first}){hint}.") from e

    if jax.process_count() == 1:
        folder = download(revision)
        return folder, os.path.basename(os.path.normpath(folder))
    commit = ""
    if jax.process_index() == 0:
        commit = os.path.basename(os.path.normpath(download(revision)))
    # the commit (40 hex digits) as bytes, so that every host fetches what process 0 resolved
    raw = np.frombuffer(commit.encode().ljust(64, b"\0"), np.uint8)
    commit = bytes(multihost_utils.broadcast_one_to_all(raw)).rstrip(b"\0").decode()
    return download(commit), commit


def _copy_url(url: str, cache_dir: Optional[str]) -> str:
    """A bucket file or folder copied into the local cache once; its local path."""
    import fsspec  # optional: only a bucket URL needs it

    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lalign", "remote")
    name = os.path.basename(url.rstrip("/")) or "checkpoint"
    dest = os.path.join(cache, hashlib.sha256(url.encode()).hexdigest()[:16], name)
    done = dest + ".complete"
    if os.path.exists(done):
        return dest
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"No checkpoint at {url}.")
    staging = f"{dest}.partial-{os.getpid()}"
    log.info(f"[remote] copying {url} -> {dest}")
    if fs.isdir(root):
        for remote in fs.find(root):
            local = os.path.join(staging, os.path.relpath(remote, root))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(remote, local)
    else:
        os.makedirs(os.path.dirname(staging), exist_ok=True)
        fs.get_file(root, staging)
    if os.path.exists(dest):  # another process finished first: keep its copy
        _remove(staging)
    else:
        os.replace(staging, dest)
    open(done, "w").close()
    return dest


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
