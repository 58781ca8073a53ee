"""Formats are records in one table (lalign/checkpoints/formats.py): a format registered there is detected, read,
normalized and written by the drivers (lalign.checkpoints.load, lalign.export) with no other change."""
import dataclasses
import os

import numpy as np
import pytest

from interop import SIGLIP, assert_same_tree, make
from lalign import export
from lalign.checkpoints import bigvision, formats, load
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
