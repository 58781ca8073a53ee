"""Checkpoints by name (lalign.checkpoints.hub): hub ids from a pre-filled huggingface_hub cache (never the
network), bucket URLs through fsspec (its in-memory file system stands in for gs://), local paths untouched."""
import json
import os

import pytest

from lalign.checkpoints import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(cache: str, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> str:
    """The layout huggingface_hub keeps (models--OWNER--NAME/{refs/main, snapshots/COMMIT/...}); the snapshot dir."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(snapshot, name)), exist_ok=True)
        with open(os.path.join(snapshot, name), "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """huggingface_hub pointed at an empty cache under tmp_path, offline (what HF_HUB_OFFLINE=1 sets)."""
    from huggingface_hub import constants

    cache = str(tmp_path / "hf_cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_resolves_to_its_cached_snapshot_and_records_the_commit(offline_cache):
    snapshot = fill_hub_cache(offline_cache, "facebook/dinov2-small",
                              {"config.json": b'{"model_type": "dinov2"}', "model.safetensors": b"x"})
    r = hub.resolve("facebook/dinov2-small")
    assert r.path == snapshot and r.revision == COMMIT
    assert r.record() == {"source": "facebook/dinov2-small", "path": snapshot, "revision": COMMIT}
    assert hub.resolve(f"facebook/dinov2-small@{COMMIT}").path == snapshot  # a pinned revision


def test_timm_hub_spelling_resolves_to_the_state_dict(offline_cache):
    snapshot = fill_hub_cache(offline_cache, "timm/vit_base_patch16_siglip_224.webli",
                              {"config.json": json.dumps({"architecture": "vit_base_patch16_siglip_224"}).encode(),
                               "model.safetensors": b"x"})
    r = hub.resolve("hf-hub:timm/vit_base_patch16_siglip_224.webli")
    assert r.path == os.path.join(snapshot, "model.safetensors") and r.revision == COMMIT


def test_an_uncached_hub_id_offline_is_one_clear_error(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"facebook/nothere: no such local path.*HF_HUB_OFFLINE is set"):
        hub.resolve("facebook/nothere")


def test_local_paths_are_never_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/teacher")
    assert not hub.is_remote("runs/teacher") and hub.resolve("runs/teacher").path == "runs/teacher"
    assert not hub.is_remote(str(tmp_path)) and not hub.is_remote("")
    assert hub.is_remote("runs/missing") and hub.is_remote("gs://bucket/x") and hub.is_remote("hf-hub:timm/a")


def test_a_bucket_folder_is_copied_once_into_the_cache(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/teacher/config.json", b"{}")
    fs.pipe("/bucket/teacher/weights/model.safetensors", b"abc")
    r = hub.resolve("memory://bucket/teacher", cache_dir=str(tmp_path / "cache"))
    assert open(os.path.join(r.path, "weights", "model.safetensors"), "rb").read() == b"abc"
    assert sorted(os.listdir(r.path)) == ["config.json", "weights"] and r.revision is None
    fs.rm("/bucket/teacher", recursive=True)  # the second resolve reads the completed copy, not the bucket
    assert hub.resolve("memory://bucket/teacher", cache_dir=str(tmp_path / "cache")).path == r.path
    with pytest.raises(FileNotFoundError, match="No checkpoint at memory://bucket/other"):
        hub.resolve("memory://bucket/other", cache_dir=str(tmp_path / "cache"))
