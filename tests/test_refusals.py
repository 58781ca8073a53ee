"""Inputs that cannot work are refused up front, as one line, before anything is written: an export into a folder
that rotates or that it reads from, a damaged safetensors file, an image folder with nothing readable in it."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lalign import export
from lalign.checkpoints import bigvision
from lalign.checkpoints.manager import save_params
from lalign.models.vit import ViT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                  for d, _, files in os.walk(root) for f in files)


@pytest.fixture(scope="module")
def tiny_params():
    model = ViT(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(4, 4), pool_type="map")
    return model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]


@pytest.fixture(scope="module")
def teacher_npz(tmp_path_factory, tiny_params):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.npz")
    bigvision.save_npz(path, tiny_params)
    return path


# ------------------------------------------------------------------ export into a folder it must not write to
def _workdir(root, tiny_params):
    """A workdir's layout: config.json, and params under checkpoints/latest/30 and checkpoints/best/20."""
    (root / "checkpoints" / "latest").mkdir(parents=True)
    (root / "config.json").write_text("{}")
    save_params(str(root / "checkpoints" / "latest" / "30"), tiny_params)
    save_params(str(root / "teacher" / "params"), tiny_params)
    return root


@pytest.mark.parametrize("where,reason", [
    ("checkpoints/latest/30/hf", "inside the input"),
    ("checkpoints/hf", "inside the checkpoints folder of the workdir"),
    ("checkpoints/latest/hf", "inside the checkpoints folder of the workdir"),
])
def test_export_refuses_an_output_inside_its_input_or_a_workdirs_checkpoints(tiny_params, tmp_path, capsys, where,
                                                                            reason):
    workdir = _workdir(tmp_path / "W", tiny_params)
    before = _tree(workdir)
    output = workdir / where
    code = export.cli(["--input", str(workdir / "checkpoints" / "latest" / "30"), "--output", str(output), "--to",
                       "hf", "--no-head"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"lalign.export: error: --output {output}"), err
    assert reason in err[0], err
    assert _tree(workdir) == before  # nothing written


def test_export_refuses_an_output_inside_the_head_from_checkpoint(tiny_params, teacher_npz, tmp_path, capsys):
    workdir = _workdir(tmp_path / "W", tiny_params)
    head_from = workdir / "teacher" / "params"
    before = _tree(workdir)
    code = export.cli(["--input", teacher_npz, "--output", str(head_from / "hf"), "--to", "hf",
                       "--head-from", str(head_from)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "inside the input" in err[0] and "--head-from" in err[0], err
    assert _tree(workdir) == before


def test_export_beside_a_workdir_still_works(tiny_params, tmp_path, capsys):
    workdir = _workdir(tmp_path / "W", tiny_params)
    code = export.cli(["--input", str(workdir / "checkpoints" / "latest" / "30"), "--output",
                       str(workdir / "exports" / "hf"), "--to", "hf", "--no-head"])
    assert code == 0, capsys.readouterr().err
    assert (workdir / "exports" / "hf" / "model.safetensors").is_file()


# ------------------------------------------------------------------ damaged safetensors inputs
def _truncate(path, keep):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep(len(data))])


@pytest.mark.parametrize("to,frm", [("timm", None), ("timm", "timm"), ("hf", None), ("open_clip", "open_clip")])
@pytest.mark.parametrize("keep", [lambda n: n // 2, lambda n: 5], ids=["half", "header"])
def test_a_truncated_safetensors_input_is_one_line_naming_the_file(teacher_npz, tmp_path, capsys, to, frm, keep):
    if to == "open_clip":  # a state dict with open_clip's names (the export needs a projection)
        from safetensors.numpy import save_file

        damaged = str(tmp_path / "open_clip.safetensors")
        save_file({"conv1.weight": np.zeros((16, 3, 4, 4), np.float32),
                   "transformer.resblocks.0.ln_1.weight": np.ones(16, np.float32)}, damaged)
    else:
        out = str(tmp_path / ("hf" if to == "hf" else "m.safetensors"))
        assert export.cli(["--input", teacher_npz, "--output", out, "--to", to] +
                          (["--kind", "siglip"] if to == "hf" else [])) == 0
        damaged = os.path.join(out, "model.safetensors") if to == "hf" else out
    _truncate(damaged, keep)
    capsys.readouterr()
    args = ["--input", os.path.dirname(damaged) if to == "hf" else damaged, "--output", str(tmp_path / "again.npz"),
            "--to", "bigvision", "--num-heads", "2"] + (["--from", frm] if frm else [])
    code = export.cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert damaged in err[0] and "truncated or damaged" in err[0], err
    assert not (tmp_path / "again.npz").exists()


def test_a_truncated_safetensors_is_one_line_from_the_command_line(teacher_npz, tmp_path):
    out = str(tmp_path / "m.safetensors")
    assert export.cli(["--input", teacher_npz, "--output", out, "--to", "timm"]) == 0
    _truncate(out, lambda n: n - 100)
    env = dict(os.environ, LALIGN_TCMALLOC="0", JAX_PLATFORMS="cpu")
    env.pop("LALIGN_TRACEBACK", None)
    r = subprocess.run([sys.executable, "-m", "lalign.export", "--input", out, "--output", str(tmp_path / "hf"),
                        "--to", "hf"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"lalign.export: error: {out}") and "truncated or damaged" in lines[0]


# ------------------------------------------------------------------ image folders with nothing readable
FOLDER_CONFIG = "configs/siglip_so400m.py:smoke_folder"  # a random teacher on an image folder, 16 held out


def _folder(root, corrupt: int, good: int = 0):
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(corrupt):
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        (root / f"class{i % 2}" / f"{i:03d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg " + bytes(i))
    for i in range(good):
        (root / "good").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "good" / f"{i}.jpg")
    return root


def _folder_config(path):
    from conftest import load_config

    name, arg = FOLDER_CONFIG.split(":")
    c = load_config(name, arg)
    c.data.path = str(path)
    return c


@pytest.mark.parametrize("corrupt,expected", [(0, "No images"), (40, "none of the 16 images sampled")])
def test_an_unreadable_image_folder_is_refused_before_the_workdir_is_made(tmp_path, corrupt, expected):
    from lalign import pipeline

    folder = _folder(tmp_path / "images", corrupt)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        pipeline.run(_folder_config(folder), str(workdir))
    message = str(err.value)
    assert expected in message and str(folder) in message, message
    if corrupt:  # an example file and why it could not be decoded
        assert re.search(re.escape(str(folder / "class0" / "000.jpg")) + r": \w+Error: ", message), message
    assert not workdir.exists()


def test_an_unreadable_image_folder_leaves_an_existing_workdir_as_it_was(tmp_path):
    from lalign import pipeline

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="none of the 16 images sampled"):
        pipeline.run(_folder_config(_folder(tmp_path / "images", 40)), str(workdir))
    assert os.listdir(workdir) == ["notes.txt"]


def test_a_folder_with_some_readable_images_is_sampled_not_refused(tmp_path):
    from lalign.data.image_folder import ImageFolder

    c = _folder_config(_folder(tmp_path / "images", 30, good=3)).data
    ImageFolder(c, "maskembed").check_readable()  # some decode: the corrupt ones are skipped in training


@pytest.mark.parametrize("corrupt,expected", [(0, "No images"), (24, "could be decoded")])
def test_cli_refuses_an_unreadable_image_folder_in_one_line(tmp_path, corrupt, expected):
    folder = _folder(tmp_path / "images", corrupt)
    env = dict(os.environ, LALIGN_TCMALLOC="0", JAX_PLATFORMS="cpu")
    env.pop("LALIGN_TRACEBACK", None)
    r = subprocess.run([sys.executable, "-m", "lalign.main", f"--config={FOLDER_CONFIG}",
                        f"--workdir={tmp_path / 'run'}", f"--config.data.path={folder}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("lalign.main: error: ") and str(folder) in lines[0] and expected in lines[0], lines
    assert not (tmp_path / "run").exists()
