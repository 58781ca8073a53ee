"""Nothing lost, nothing silently wrong: what a CLI writes never destroys what was there."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lalign import export, files
from lalign.checkpoints import bigvision, load, manager
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
    model, params = load.load_any(str(out), to, {"num_heads": 2})
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
    assert load.load_any(str(workdir / "teacher" / "params"), "orbax", {})[0].width == 16


def test_a_failed_write_keeps_the_old_output(tmp_path):
    out = tmp_path / "model.npz"
    out.write_bytes(b"old")

    def half_then_fail(stage):
        with open(stage, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomically(str(out), half_then_fail)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.npz"]
    files.write_atomically(str(out), lambda stage: np.savez(stage, a=np.ones(2)))
    assert np.load(out)["a"].tolist() == [1, 1] and os.listdir(tmp_path) == ["model.npz"]


# ------------------------------------------------------------------------------ verified checkpoints
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import load_config

    from lalign.pretrain import pretrain_teacher

    return pretrain_teacher(load_config(arg="tiny"), str(tmp_path_factory.mktemp("teacher")))


def _state_files(step_dir):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs)


def _flip_bytes(step_dir, seed=0) -> list[str]:
    """Flips 64 bytes of a data file of the step, at random places until an array reads back changed (some bytes
    of a file are index, not values): what a bad disk or a torn copy does, and what orbax alone reads back without
    complaint. Returns the paths of the arrays that changed."""
    from lalign.checkpoints.manager import restore_arrays
    from lalign.sharding import path_str

    def arrays():
        return {path_str(p): np.asarray(x) for p, x in
                jax.tree_util.tree_leaves_with_path(restore_arrays(str(step_dir / "default")))}

    before, rng = arrays(), np.random.default_rng(seed)
    files = [f for f in _state_files(step_dir) if f"{os.sep}d{os.sep}" in f and os.path.getsize(f) > 1000]
    for _ in range(50):
        path = files[int(rng.integers(len(files)))]
        original = open(path, "rb").read()
        at = int(rng.integers(0, len(original) - 64))
        flipped = bytearray(original)
        flipped[at:at + 64] = bytes(b ^ 0xFF for b in original[at:at + 64])
        open(path, "wb").write(bytes(flipped))
        try:
            changed = [k for k, v in arrays().items() if not np.array_equal(v, before[k], equal_nan=True)]
        except Exception:  # noqa: BLE001 - unreadable: try another place (lalign handles that case too)
            changed = []
        if changed:
            return changed
        open(path, "wb").write(original)
    raise AssertionError(f"no flip under {step_dir} changed an array")


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous_step(tiny_config, teacher, tmp_path):
    from lalign.train import train_maskembed

    tiny_config.update(total_steps=6, checkpoint_every=2, eval_every=0)
    full = train_maskembed(tiny_config, str(tmp_path), *teacher)["last_params"]
    latest = tmp_path / "checkpoints" / "latest"
    assert sorted(os.listdir(latest)) == ["4", "6"]
    changed = _flip_bytes(latest / "6")
    with pytest.warns(UserWarning, match=r"Resuming from step 4, the newest checkpoint that verifies; Step 6 .* "
                                         r"failed verification and was moved to .*quarantine.6.*: "
                                         rf"{re.escape(changed[0])} \(.*\): its bytes differ from what was saved"):
        resumed = train_maskembed(tiny_config, str(tmp_path), *teacher)  # the same run, started again
    assert resumed["step"] == 6
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed["last_params"])):
        np.testing.assert_array_equal(a, b)  # steps 5 and 6 trained again from a good step 4: the same result

    # export refuses a step whose bytes changed, naming the array
    changed = _flip_bytes(latest / "6", seed=1)
    with pytest.raises(ValueError, match=rf"failed verification against .*checksums/latest/6.json: "
                                         rf"{re.escape(changed[0])} "):
        manager.restore_verified(str(latest / "6"))


def test_no_checkpoint_verifies_is_a_clear_error(tiny_config, teacher, tmp_path):
    from lalign.checkpoints.manager import CheckpointError
    from lalign.train import train_maskembed

    tiny_config.update(total_steps=2, checkpoint_every=1, eval_every=0)
    train_maskembed(tiny_config, str(tmp_path), *teacher)
    for step in ("1", "2"):
        for f in _state_files(tmp_path / "checkpoints" / "latest" / step):
            open(f, "wb").write(b"\0" * os.path.getsize(f))
    with pytest.raises(CheckpointError, match=r"Step 2 .* failed verification .* Step 1 .* failed verification .* "
                                              r"No checkpoint is left to resume from"):
        train_maskembed(tiny_config, str(tmp_path), *teacher)


def test_a_diverging_run_saves_no_nan_state_and_says_what_a_restart_does(tiny_config, teacher, tmp_path):
    """log_every=5 with a save every step: the loss is checked every step (the previous step's, while the next
    runs) and the state before each save, so no non-finite step reaches the disk."""
    from lalign.checkpoints.manager import restore_arrays
    from lalign.train import train_maskembed

    tiny_config.update(total_steps=12, checkpoint_every=1, log_every=5, eval_every=0)
    tiny_config.optimizer.update(lr=1e30, grad_clip=0.0)  # diverges within a few steps
    with pytest.raises(FloatingPointError) as err:
        train_maskembed(tiny_config, str(tmp_path), *teacher)
    latest = tmp_path / "checkpoints" / "latest"
    steps = sorted(int(s) for s in os.listdir(latest)) if latest.exists() else []
    for step in steps:
        tree = restore_arrays(str(latest / str(step) / "default"))
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating))
    message = str(err.value)
    assert "intact" not in message and "step None" not in message
    if steps:
        assert f"A restart resumes from the newest checkpoint that verifies: step {steps[-1]}" in message
    else:
        assert "No checkpoint has been saved yet" in message


# ---------------------------------------------------------------------------------- one run per workdir
def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    import json
    import socket
    import subprocess
    import time

    from lalign.workdir import WorkdirBusy, WorkdirLock

    first = WorkdirLock(str(tmp_path), heartbeat_s=0.05).acquire()
    with pytest.raises(WorkdirBusy, match=rf"is in use by another run \(host {socket.gethostname()}, pid "
                                          rf"{os.getpid()}, started .*\)\. Wait for it"):
        WorkdirLock(str(tmp_path)).acquire()
    beat = json.loads((tmp_path / "lock.json").read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / "lock.json").read_text())["heartbeat"] > beat  # renewed while held
    first.release()
    assert not (tmp_path / "lock.json").exists()

    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = {"host": socket.gethostname(), "pid": dead.pid, "started": time.time(), "heartbeat": time.time(),
             "command": ["python", "-m", "lalign.main"]}
    (tmp_path / "lock.json").write_text(json.dumps(owner))
    lock = WorkdirLock(str(tmp_path)).acquire()
    assert f"its process {dead.pid} on this host is gone" in lock.note
    lock.release()

    other_host = dict(owner, host="another-vm", pid=1)
    (tmp_path / "lock.json").write_text(json.dumps(other_host))  # renewed just now: alive
    with pytest.raises(WorkdirBusy, match="host another-vm, pid 1"):
        WorkdirLock(str(tmp_path)).acquire()
    (tmp_path / "lock.json").write_text(json.dumps(dict(other_host, heartbeat=time.time() - 3600)))
    lock = WorkdirLock(str(tmp_path)).acquire()  # a preempted VM's lock: no heartbeat for an hour
    assert "has not been renewed for 60 minutes" in lock.note
    lock.release()


def test_a_second_run_on_a_busy_workdir_refuses_and_leaves_it_alone(tmp_path):
    import json
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "lalign.main", "--config=configs/demo.py:tiny", f"--workdir={tmp_path}",
           "--config.total_steps=40", "--config.log_every=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "lock.json").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    assert "is in use by another run (host" in second.stderr and f"pid {first.pid}," in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1  # one line, no traceback
    out, err = first.communicate(timeout=400)
    assert first.returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r["step"] for r in rows if r.get("stage") == "maskembed" and "loss" in r]
    assert steps == list(range(1, 41))  # one run's records, once
    assert not (tmp_path / "lock.json").exists()  # released at the end


# ------------------------------------------------------------------------ validated before anything runs
def test_a_bad_config_is_refused_whole_before_anything_is_written(tiny_config, tmp_path):
    from lalign import pipeline

    tiny_config.update(total_steps=0, batch_size=0)
    tiny_config.optimizer.lr = -1e-3
    tiny_config.maskembed.update(sampler="unifrom", loss="mse_typo")
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        pipeline.run(tiny_config, str(workdir))
    message = str(err.value)
    assert message.startswith("Invalid config (nothing was written): ")
    for expected in ("config.total_steps must be a positive integer, got 0",
                     "config.batch_size must be a positive integer, got 0",
                     "config.optimizer.lr must be a positive number, got -0.001",
                     "config.maskembed.sampler must be one of ('uniform', 'bernoulli', 'block'), got 'unifrom'",
                     "config.maskembed.loss must be one of ('mse', 'cosine', 'l1', 'mse_masked', 'mse_unmasked'), got "
                     "'mse_typo'"):
        assert expected in message, message
    assert not workdir.exists()  # not even the folder: the teacher was not trained either


@pytest.mark.parametrize("override,expected", [
    ("--config.optimizer.lr=0", "config.optimizer.lr must be a positive number, got 0"),
    ("--config.batch_size=6", "config.batch_size 6 is not divisible by the 8 batch shards of the mesh"),
])
def test_cli_bad_values_are_one_line(tmp_path, override, expected):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "lalign.main", "--config=configs/demo.py:tiny",
                        f"--workdir={tmp_path / 'run'}", override, "--config.mesh.data=-1"],
                       cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and expected in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """configs/demo.py:tiny run to its end (teacher, MaskEmbed, probes)."""
    from conftest import load_config

    from lalign import pipeline

    workdir = tmp_path_factory.mktemp("finished")
    pipeline.run(load_config(arg="tiny"), str(workdir))
    return workdir


def test_resuming_with_another_model_or_batch_is_refused_and_leaves_the_workdir_as_it_was(finished_run, tiny_config):
    from lalign import pipeline

    before = _tree(finished_run)
    saved = (finished_run / "config.json").read_bytes()
    tiny_config.model.width = 24
    tiny_config.batch_size = 16
    with pytest.raises(ValueError, match=r"holds checkpoints of another run: model: .*\"width\": 16.* now; "
                                         r"batch_size: 8 in the workdir's checkpoints, 16 now\."):
        pipeline.run(tiny_config, str(finished_run))
    assert (finished_run / "config.json").read_bytes() == saved and _tree(finished_run) == before
    step = max(int(s) for s in os.listdir(finished_run / "checkpoints" / "best"))
    assert export.cli(["--input", str(finished_run / "checkpoints" / "best" / str(step)), "--output",
                       str(finished_run.parent / "exported"), "--to", "bigvision"]) == 0  # still exports


def test_extending_a_finished_run_probes_the_new_checkpoint(finished_run, tiny_config, tmp_path):
    import json
    import shutil

    from lalign import pipeline

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    old = json.loads((workdir / "probe" / "aligned.json").read_text())
    tiny_config.total_steps = 2 * tiny_config.total_steps
    summary = pipeline.run(tiny_config, str(workdir))
    new = json.loads((workdir / "probe" / "aligned.json").read_text())
    assert summary["maskembed"]["step"] == tiny_config.total_steps
    assert new["key"]["backbone"]["step"] == summary["maskembed"]["best_step"] != old["key"]["backbone"]["step"]
    assert json.loads((workdir / "probe" / "results.json").read_text())["probe"]["aligned"] == new["patch"]


def test_16_bit_images_are_scaled_not_clipped():
    import io

    from PIL import Image

    from lalign.data.images import decode_and_crop

    grey = np.full((32, 32), 32768, np.uint16)  # mid-grey at 16 bits
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG")
    opts = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, val_crop_fraction=1.0)
    out = decode_and_crop(buf.getvalue(), 16, False, np.random.default_rng(0), opts)
    assert out.shape == (16, 16, 3) and np.all(out == 128)  # PIL's convert alone gives 255 (white)


@pytest.mark.parametrize("damage,expected", [
    ("missing", "missing (1): Transformer/encoderblock_1/MlpBlock_0/Dense_0/bias"),
    ("extra", "unexpected (1): Transformer/encoderblock_1/extra"),
    ("shape", "Transformer/encoderblock_1/MlpBlock_0/Dense_0/bias"),
])
def test_export_to_bigvision_checks_the_tensors_it_writes(teacher_npz, tmp_path, capsys, damage, expected):
    flat = dict(np.load(teacher_npz))
    key = "Transformer/encoderblock_1/MlpBlock_0/Dense_0/bias"
    if damage == "missing":
        del flat[key]
    elif damage == "extra":
        flat["Transformer/encoderblock_1/extra"] = np.zeros(3, np.float32)
    else:
        flat[key] = np.zeros(31, np.float32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **flat)
    assert export.cli(["--input", str(bad), "--output", str(tmp_path / "out.npz"), "--to", "bigvision"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lalign.export: error: ") and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out.npz").exists()


def test_a_workdir_whose_checkpoints_are_all_damaged_is_one_clear_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "lalign.main", "--config=configs/demo.py:tiny", f"--workdir={tmp_path}",
           "--config.stages=('pretrain','maskembed')", "--config.checkpoint_every=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    assert subprocess.run(cmd, cwd=root, env=env, capture_output=True, timeout=300).returncode == 0
    for step in os.listdir(tmp_path / "checkpoints" / "latest"):
        for f in _state_files(tmp_path / "checkpoints" / "latest" / step / "default"):
            open(f, "wb").write(b"\0" * os.path.getsize(f))
    r = subprocess.run(cmd + ["--config.total_steps=8"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("lalign.main: error: Step 6 under "), r.stderr[-3000:]
    assert "No checkpoint is left to resume from" in lines[-1]
    assert "Traceback" not in r.stderr and "ERROR" not in r.stderr, r.stderr[-3000:]


def test_an_image_border_outside_the_patch_grid_is_stated(capsys, tmp_path):
    """So400m/14 at 384 px leaves 6 pixel rows and columns outside the patch grid by design; never silently."""
    from conftest import load_config

    from lalign import pipeline

    c = load_config("configs/siglip_so400m.py", "smoke")  # 30 px, patch 7: the grid covers 28
    c.update(total_steps=1, eval_every=1, quiet=True)
    pipeline.run(c, str(tmp_path))
    assert ("[maskembed] image 30 px, patch 7: the patch grid covers 28 px; the last 2 pixel rows and columns are "
            "outside it") in capsys.readouterr().out


def test_a_lock_from_before_a_reboot_is_stale(tmp_path):
    import json
    import socket
    import time

    from lalign.workdir import WorkdirLock

    owner = {"host": socket.gethostname(), "boot": "an-earlier-boot", "pid": os.getpid(), "started": time.time(),
             "heartbeat": time.time(), "command": []}  # the pid is alive now, but it is not that run
    (tmp_path / "lock.json").write_text(json.dumps(owner))
    lock = WorkdirLock(str(tmp_path)).acquire()
    assert "this host has rebooted since" in lock.note
    lock.release()
