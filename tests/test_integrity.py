"""Nothing lost, nothing silently wrong: what a CLI writes never destroys what was there."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lalign import export
from lalign.checkpoints import bigvision
from lalign.models.vit import ViT


@pytest.fixture(scope="module")
def teacher_npz(tmp_path_factory):
    model = ViT(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(4, 4), pool_type="map")
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.npz")
    bigvision.save_npz(path, params)
    return path


def _tree(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                  for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("to,name", [("orbax", "workdir"), ("hf", "hf_dir"), ("bigvision", "out.npz"),
                                     ("timm", "out.safetensors")])
def test_export_refuses_an_existing_output_unless_overwrite(teacher_npz, tmp_path, capsys, to, name):
    out = tmp_path / name
    if name.endswith((".npz", ".safetensors")):
        out.write_bytes(b"someone's file")
        before = out.read_bytes()
    else:  # a folder with work in it (in the failure reproduced: a whole workdir)
        (out / "checkpoints" / "latest" / "6").mkdir(parents=True)
        (out / "metrics.jsonl").write_text('{"step": 6}\n')
        (out / "checkpoints" / "latest" / "6" / "state").write_bytes(b"x" * 100)
        before = _tree(out)
    args = ["--input", teacher_npz, "--output", str(out), "--to", to]
    assert export.cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lalign.export: error: --output: {out} already exists "
                   f"({'a file' if out.is_file() else 'a directory with 2 entries'}); choose a new path, or pass "
                   f"--overwrite to replace it."]
    assert (out.read_bytes() if out.is_file() else _tree(out)) == before  # untouched

    assert export.cli(args + ["--overwrite"]) == 0
    assert not (out / "metrics.jsonl").exists() if out.is_dir() else out.read_bytes() != before
    assert not [f for f in os.listdir(tmp_path) if ".partial-" in f or ".replaced-" in f]  # no leftovers
    model, params = export.load_any(str(out), to, {"num_heads": 2})
    assert model.width == 16


def test_export_never_replaces_its_own_input(teacher_npz, tmp_path, capsys):
    workdir = tmp_path / "run"
    (workdir / "teacher").mkdir(parents=True)
    assert export.cli(["--input", teacher_npz, "--output", str(workdir / "teacher" / "params"), "--to",
                       "orbax"]) == 0
    for output in (workdir, workdir / "teacher" / "params"):  # the checkpoint itself, or a folder holding it
        code = export.cli(["--input", str(workdir / "teacher" / "params"), "--output", str(output), "--to",
                           "orbax", "--overwrite"])
        assert code == 2 and "would replace the input" in capsys.readouterr().err
    assert export.load_any(str(workdir / "teacher" / "params"), "orbax", {})[0].width == 16


def test_a_failed_write_keeps_the_old_output(tmp_path):
    out = tmp_path / "model.npz"
    out.write_bytes(b"old")

    def half_then_fail(stage):
        with open(stage, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export.write_in_place(str(out), half_then_fail)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.npz"]
    export.write_in_place(str(out), lambda stage: np.savez(stage, a=np.ones(2)))
    assert np.load(out)["a"].tolist() == [1, 1] and os.listdir(tmp_path) == ["model.npz"]
