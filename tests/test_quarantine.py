"""A damaged checkpoint step is never used and never destroyed: it fails verification (a flipped block, a missing
or unreadable checksum record), the run falls back to the step before it, and the step is moved aside to
`checkpoints/quarantine/STEP` with the reason, where its params can still be exported if they verify."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lalign import export
from lalign.checkpoints import load, verify
from lalign.checkpoints.manager import CheckpointError, Checkpoints, restore_verified
from lalign.models.vit import ViT

VIT = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(4, 4), pool_type="none")


@pytest.fixture(scope="module")
def student():
    return ViT(**VIT).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]


def _state(step: int, student) -> dict:
    """A train state's shape: step, params (the student ViT), optimizer moments."""
    params = jax.tree.map(lambda x: x + step, {"student": student})
    return {"step": jnp.int32(step), "params": params,
            "opt": {"mu": jax.tree.map(jnp.zeros_like, params), "nu": jax.tree.map(jnp.ones_like, params)}}


def _saved(tmp_path, student, steps=(1, 2)) -> Checkpoints:
    ckpts = Checkpoints(str(tmp_path / "checkpoints"), async_save=False)
    for step in steps:
        ckpts.save(step, _state(step, student))
    ckpts.wait()
    return ckpts


def _restart(tmp_path, student):
    """A new run on the same workdir: what train.py does when it starts again."""
    ckpts = Checkpoints(str(tmp_path / "checkpoints"), async_save=False)
    return ckpts, ckpts.restore_latest(_state(0, student))


def _record(tmp_path, step):
    return tmp_path / "checkpoints" / "checksums" / "latest" / f"{step}.json"


def _damage_record(tmp_path, step, key_prefix="opt/") -> str:
    """The record and the bytes disagree on one array under `key_prefix`: what a flipped block in that array
    reads back as. Returns the array's path."""
    path = _record(tmp_path, step)
    record = json.loads(path.read_text())
    key = sorted(k for k in record["arrays"] if k.startswith(key_prefix))[0]
    record["arrays"][key]["sums"][0] ^= 1
    path.write_text(json.dumps(record))
    return key


def test_a_step_without_its_record_falls_back_and_the_note_says_what_a_restart_does(tmp_path, student):
    ckpts = _saved(tmp_path, student)
    _record(tmp_path, 2).unlink()  # its bytes may be anything: nothing says what step 2 held
    with pytest.raises(ValueError, match=r"/2/default was saved with a checksum record, and the record is missing"):
        restore_verified(str(tmp_path / "checkpoints" / "latest" / "2"))  # export refuses it too
    note = ckpts.resume_note()
    assert "step 1 " in note, note
    with pytest.warns(UserWarning, match=r"Resuming from step 1, the newest checkpoint that verifies; Step 2 .* "
                                         r"failed verification .*: its checksum record .*checksums/latest/2\.json "
                                         r"is missing"):
        _, state = _restart(tmp_path, student)
    assert int(state["step"]) == 1  # what the note said
    assert (tmp_path / "checkpoints" / "quarantine" / "2" / "default").is_dir()


def test_a_step_an_older_lalign_wrote_is_restored_unverified_and_the_note_says_so(tmp_path, student):
    ckpts = Checkpoints(str(tmp_path / "checkpoints"), async_save=False)
    for step in (1, 2):  # as lalign wrote steps before checksums: no record, no marker in the step's metadata
        ckpts.latest.save(step, args=ocp.args.PyTreeSave(_state(step, student)), force=True)
    ckpts.wait()
    assert int(restore_verified(str(tmp_path / "checkpoints" / "latest" / "2"))["step"]) == 2  # export reads it
    note = ckpts.resume_note()
    assert "step 2 " in note and "unverified" in note, note
    with pytest.warns(UserWarning, match=r"/2 has no checksum record \(saved by an older lalign\): restored "
                                         r"unverified"):
        _, state = _restart(tmp_path, student)
    assert int(state["step"]) == 2


def test_a_truncated_record_is_a_verification_failure_naming_the_file(tmp_path, student):
    _saved(tmp_path, student)
    record = _record(tmp_path, 2)
    record.write_text(record.read_text()[:95])  # a torn write or copy
    with pytest.raises(ValueError, match=rf"{re.escape(str(record))} cannot be read"):
        restore_verified(str(tmp_path / "checkpoints" / "latest" / "2"))
    with pytest.warns(UserWarning, match=rf"Step 2 .* failed verification .*: its checksum record "
                                         rf"{re.escape(str(record))} cannot be read \(JSONDecodeError"):
        _, state = _restart(tmp_path, student)
    assert int(state["step"]) == 1


def test_damaged_steps_are_quarantined_not_deleted_and_their_params_export(tmp_path, student):
    _saved(tmp_path, student)
    damaged = {step: _damage_record(tmp_path, step) for step in (1, 2)}  # params intact in both
    with pytest.raises(CheckpointError) as err:
        _restart(tmp_path, student)
    message = str(err.value)
    quarantine = tmp_path / "checkpoints" / "quarantine"
    for step, key in damaged.items():
        assert re.search(rf"Step {step} .* failed verification and was moved to {re.escape(str(quarantine))}/"
                         rf"{step} \(its params verify\): {re.escape(key)} ", message), message
        kept = quarantine / str(step)
        assert (kept / "default").is_dir() and (kept / "checksums.json").is_file()
        assert key in (kept / "REASON.txt").read_text()
    assert "restore one from a copy" not in message and "--params-only" in message
    assert not [s for s in os.listdir(tmp_path / "checkpoints" / "latest") if s.isdigit()]
    assert Checkpoints(str(tmp_path / "checkpoints")).resume_note().startswith("No checkpoint")

    # the whole step refuses to load; its params alone verify and export
    with pytest.raises(ValueError, match=r"failed verification .*" + re.escape(damaged[2])):
        restore_verified(str(quarantine / "2"))
    out = tmp_path / "student_params"
    assert export.cli(["--input", str(quarantine / "2"), "--output", str(out), "--to", "orbax", "--params-only",
                       "--num-heads", "2"]) == 0
    model, params = load.load_any(str(out), "orbax", {})
    want = _state(2, student)["params"]["student"]
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_params_only_refuses_params_that_do_not_verify(tmp_path, student, capsys):
    _saved(tmp_path, student)
    key = _damage_record(tmp_path, 2, "params/")
    code = export.cli(["--input", str(tmp_path / "checkpoints" / "latest" / "2"), "--output",
                       str(tmp_path / "out"), "--to", "orbax", "--params-only", "--num-heads", "2"])
    assert code == 2 and key in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_for_step_dir_finds_a_quarantined_record(tmp_path):
    step = tmp_path / "checkpoints" / "quarantine" / "7"
    (step / "default").mkdir(parents=True)
    assert verify.for_step_dir(str(step / "default")) is None
    (step / "checksums.json").write_text("{}")
    assert verify.for_step_dir(str(step)) == str(step / "checksums.json")
