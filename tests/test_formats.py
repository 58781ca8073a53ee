"""Formats are records in one table (lalign/checkpoints/formats.py): a format registered there is detected, read,
normalized and written by the drivers (lalign.checkpoints.load, lalign.export) with no other change."""
import dataclasses
import json
import os

import numpy as np
import pytest

from interop import SIGLIP, assert_same_tree, make
from lalign import export
from lalign.checkpoints import bigvision, formats, load, records
from lalign.checkpoints.common import flatten, infer_model, to_layout, unflatten
from lalign.files import write_atomically


def _read_toy(path, fields, *, tower="img", quiet=False, recorded_wins=False):
    with np.load(path) as f:
        params = unflatten({k: f[k] for k in f.files})
    return infer_model(params, **fields), params


def _write_toy(job):
    def write(stage):
        with open(stage, "wb") as f:  # a file handle: np.savez adds no .npz
            np.savez(f, **flatten(to_layout(job.params, False)))

    write_atomically(job.output, write)


# a toy format: per-block params as flat '/'-joined arrays in a file named *.toyvit
TOY = formats.Format("toy", detect=lambda path: path.endswith(".toyvit") and os.path.isfile(path), read=_read_toy,
                     normalization=lambda path, tower="img": ("siglip", f"{path} (a toy file)"), write=_write_toy,
                     holds_softcap=True)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(formats.FORMATS, "toy", TOY)


def test_a_format_in_the_table_is_detected_read_and_written_by_the_drivers(toy, tmp_path, capsys, monkeypatch):
    model, params = make(SIGLIP)
    npz, out, back = (str(tmp_path / f) for f in ("teacher.npz", "teacher.toyvit", "back.npz"))
    bigvision.save_npz(npz, params)
    assert "toy" in formats.inputs() and "toy" in formats.outputs()

    assert export.cli(["--input", npz, "--output", out, "--to", "toy"]) == 0  # written
    assert load.guess_format(out) == "toy"  # detected
    got_model, got = load.load_any(out)  # read
    fields = ("patch_size", "width", "depth", "mlp_dim", "num_heads", "pool_type", "has_class_token")
    assert [getattr(got_model, f) for f in fields] == [getattr(model, f) for f in fields]
    assert_same_tree(got, params)
    assert load.checkpoint_normalization(out) == ("siglip", f"{out} (a toy file)")
    assert export.cli(["--input", out, "--output", back, "--to", "bigvision"]) == 0  # read as --input, guessed
    assert_same_tree(bigvision.load_npz(back), params)
    assert load.records_model(out) is None  # the record's default: the shapes make the model
    monkeypatch.setitem(formats.FORMATS, "toy", dataclasses.replace(TOY, normalization=None))
    assert load.checkpoint_normalization(out) == ("siglip", "the SigLIP family's (no class token)")  # the model's


def test_an_unregistered_format_is_not_guessed(tmp_path):
    path = tmp_path / "teacher.toyvit"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"Cannot tell the format of .*teacher.toyvit: pass --from \(orbax/"):
        load.guess_format(str(path))
    with pytest.raises(ValueError, match=r"Unknown input format 'toy'"):
        load.load_any(str(path), "toy")


def test_a_directory_format_is_tried_before_the_orbax_fallback(monkeypatch, tmp_path):
    (tmp_path / "toy.json").write_text("{}")
    assert load.guess_format(str(tmp_path)) == "orbax"  # orbax claims any directory no other format claims
    monkeypatch.setitem(formats.FORMATS, "toydir", formats.Format(
        "toydir", detect=lambda path: os.path.isfile(os.path.join(path, "toy.json")), read=_read_toy))
    assert load.guess_format(str(tmp_path)) == "toydir"


def test_a_format_whose_record_finds_its_workdir_is_carded_with_its_runs_preprocessing(toy, tmp_path, monkeypatch):
    """The hub files take a run's preprocessing and teacher from the checkpoint's workdir where the input format's
    record finds one (`Format.workdir`), whatever the format's name."""
    model, params = make(SIGLIP)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {}, "init_from": "google/siglip-base-patch16-224",
                                                 "data": {"interpolation": "bilinear", "val_crop_fraction": 0.875}}))
    npz, ckpt = str(tmp_path / "teacher.npz"), str(run / "params.toyvit")
    bigvision.save_npz(npz, params)
    assert export.cli(["--input", npz, "--output", ckpt, "--to", "toy"]) == 0

    def pretrained_cfg(out):
        assert export.cli(["--input", ckpt, "--output", str(tmp_path / out), "--to", "timm"]) == 0
        return json.loads((tmp_path / out / "config.json").read_text())["pretrained_cfg"]

    cfg = pretrained_cfg("plain")  # the record's default: no run, the defaults' preprocessing
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["license"]) == ("bicubic", 1.0, "other")
    monkeypatch.setitem(formats.FORMATS, "toy", dataclasses.replace(TOY, workdir=records.workdir_record))
    cfg = pretrained_cfg("in_run")
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["license"]) == ("bilinear", 0.875, "apache-2.0")
    assert "base_model: google/siglip-base-patch16-224" in (tmp_path / "in_run" / "README.md").read_text()
