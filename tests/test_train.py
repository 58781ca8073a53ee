"""The training loop: learning, determinism, resume == uninterrupted, NaN guard, clear errors."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lalign import data as data_lib
from lalign import pipeline
from lalign.checkpoints.manager import Checkpoints
from lalign.pretrain import pretrain_teacher
from lalign.train import train_maskembed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def teacher(tiny_config, tmp_path_factory):
    return pretrain_teacher(tiny_config, str(tmp_path_factory.mktemp("teacher")))


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_maskembed_loss_decreases_and_metrics_are_written(tiny_config, teacher, tmp_path):
    tiny_config.total_steps = 20
    tiny_config.eval_every = 10
    result = train_maskembed(tiny_config, str(tmp_path), *teacher)
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert train[0]["step"] == 2 and train[-1]["step"] == 20
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= set(train[-1])
    assert val[-1] < val[0] * 0.7, val  # the decoder learns to predict the teacher
    assert result["best_val_loss"] == min(val[1:])
    assert os.path.isdir(tmp_path / "checkpoints" / "latest" / "20")
    # TensorBoard holds the same curves: read the event file back (TFRecord framing, tensorboardX's protos)
    scalars = _tensorboard_scalars(tmp_path / "tensorboard" / "maskembed")
    for name in ("loss", "lr", "grad_norm", "images_per_s", "val_loss"):
        got = scalars[f"maskembed/{name}"]
        want = [(r["step"], r[name]) for r in records if name in r]
        assert [s for s, _ in got] == [s for s, _ in want], name
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6, err_msg=name)


def _tensorboard_scalars(directory) -> dict:
    """{tag: [(step, value)]} of every event file in `directory`."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_same_seed_same_params_other_seed_differs(tiny_config, teacher, tmp_path):
    a = train_maskembed(tiny_config, str(tmp_path / "a"), *teacher)["params"]
    b = train_maskembed(tiny_config, str(tmp_path / "b"), *teacher)["params"]
    assert _leaves_equal(a, b)
    tiny_config.seed = 1
    c = train_maskembed(tiny_config, str(tmp_path / "c"), *teacher)["params"]
    assert not _leaves_equal(a, c)


def test_gradient_accumulation_gives_the_full_batch_step(tiny_config, teacher, tmp_path):
    tiny_config.update(total_steps=3, eval_every=0, mesh=dict(data=2, fsdp=2, tensor=1, num_devices=4))
    full = train_maskembed(tiny_config, str(tmp_path / "full"), *teacher)["last_params"]
    tiny_config.grad_accum_steps = 2  # 2 micro-batches of 4: the same masks, gradients averaged
    accum = train_maskembed(tiny_config, str(tmp_path / "accum"), *teacher)["last_params"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), full, accum)
    tiny_config.grad_accum_steps = 4  # micro-batches of 2 cannot be split over 4 batch shards
    with pytest.raises(ValueError, match="grad_accum_steps=4, each micro-batch of 2 images"):
        train_maskembed(tiny_config, str(tmp_path / "bad"), *teacher)


@pytest.mark.parametrize("whiten", (False, True), ids=("std", "whitened"))
def test_resume_after_interruption_equals_uninterrupted_run(tiny_config, teacher, tmp_path, monkeypatch, whiten):
    tiny_config.maskembed.whiten_targets = whiten  # the whitening is measured once and restored with the state
    tiny_config.eval_every = 0
    tiny_config.checkpoint_every = 3
    full = train_maskembed(tiny_config, str(tmp_path / "full"), *teacher)

    # The same run dies while loading the batch of step 5 (after its step-3 checkpoint), then is started again.
    real_source = data_lib.image_source

    class Crashing:
        def __init__(self, source):
            self.source = source

        def batch(self, step, batch_size, shard=(0, 1)):
            if step == 4:
                raise KeyboardInterrupt("simulated preemption")
            return self.source.batch(step, batch_size, shard)

    monkeypatch.setattr(data_lib, "image_source", lambda *a, **k: Crashing(real_source(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        train_maskembed(tiny_config, str(tmp_path / "resumed"), *teacher)
    monkeypatch.setattr(data_lib, "image_source", real_source)
    resumed = train_maskembed(tiny_config, str(tmp_path / "resumed"), *teacher)
    assert resumed["step"] == full["step"] == 6
    assert _leaves_equal(full["last_params"], resumed["last_params"])
    assert _leaves_equal(full["params"], resumed["params"])


def test_best_checkpoint_keeps_only_the_params_of_the_lowest_val_loss(tmp_path):
    state = {"params": {"w": jnp.zeros((2, 3))}, "opt": {"mu": jnp.zeros((2, 3))}, "step": jnp.int32(0)}
    ckpts = Checkpoints(str(tmp_path / "new"))
    for step, val in [(1, 3.0), (2, 2.0), (3, 2.5), (4, 4.0)]:
        state = dict(state, step=jnp.int32(step), params={"w": jnp.full((2, 3), float(step))})
        ckpts.save(step, state, val_loss=val)
    ckpts.wait()
    assert os.listdir(tmp_path / "new" / "best") == ["2"]  # steps 3 and 4 were worse: never written
    assert ckpts.latest.all_steps() == [3, 4] and ckpts.best_val_loss() == 2.0  # two kept: one to fall back to
    best = ckpts.restore_best(state)
    assert set(best) == {"params", "step"} and int(best["step"]) == 2  # no optimizer moments in it
    np.testing.assert_array_equal(best["params"]["w"], 2.0)
    assert int(ckpts.restore_latest(state)["step"]) == 4
    ckpts.close()

    # Best checkpoints from before this layout hold the whole train state: still read.
    old = ocp.CheckpointManager(str(tmp_path / "old" / "best"), options=ocp.CheckpointManagerOptions(
        best_fn=lambda m: m["val_loss"], best_mode="min", create=True))
    old.save(4, args=ocp.args.StandardSave(state), metrics={"val_loss": 1.0})
    old.close()
    best = Checkpoints(str(tmp_path / "old")).restore_best(state)
    assert int(best["step"]) == 4 and set(best) == {"params", "step"}
    np.testing.assert_array_equal(best["params"]["w"], 4.0)


def test_nan_loss_stops_with_a_clear_error_and_keeps_last_checkpoint(tiny_config, teacher, tmp_path, monkeypatch):
    """Batches turn to NaN after step 2 (its checkpoint saved): the run stops naming the step, step 2 stays on disk,
    finite and verified, and a restart resumes from it."""
    from lalign.checkpoints.manager import restore_verified

    source = data_lib.image_source

    class Poisoned:  # the training source, with NaN images from step 2 on
        def __init__(self, src):
            self.src = src

        def __getattr__(self, name):
            return getattr(self.src, name)

        def batch(self, step, *args, **kw):
            b = self.src.batch(step, *args, **kw)
            return dict(b, image=np.full_like(b["image"], np.nan)) if step >= 2 else b

    def poisoned(data_cfg, split, **kw):
        src = source(data_cfg, split, **kw)
        return Poisoned(src) if split == "maskembed" else src

    monkeypatch.setattr(data_lib, "image_source", poisoned)
    tiny_config.update(total_steps=6, eval_every=0, checkpoint_every=2, log_every=1, async_checkpointing=False)
    with pytest.raises(FloatingPointError, match=r"became nan at step [34].*resumes from .* step 2 under"):
        train_maskembed(tiny_config, str(tmp_path), *teacher)
    latest = tmp_path / "checkpoints" / "latest"
    assert sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == [2]
    state = restore_verified(str(latest / "2"))
    assert int(state["step"]) == 2 and all(np.all(np.isfinite(a)) for a in jax.tree.leaves(state["params"]))
    monkeypatch.setattr(data_lib, "image_source", source)
    train_maskembed(tiny_config, str(tmp_path), *teacher)
    host = json.loads((tmp_path / "hosts" / "process_0.json").read_text())
    assert (host["resumed_from"], host["step"]) == (2, 6)


def test_image_size_not_matching_the_teacher_is_a_clear_error(tiny_config, teacher, tmp_path):
    tiny_config.data.image_size = 20
    with pytest.raises(ValueError, match=r"image_size 20 .* 5x5 patches, but the model's pos_embedding has 16 rows"):
        train_maskembed(tiny_config, str(tmp_path), *teacher)


def test_pipeline_end_to_end_writes_summary_and_reuses_stages(tiny_config, tmp_path):
    summary = pipeline.run(tiny_config, str(tmp_path))
    on_disk = json.load(open(tmp_path / "summary.json"))
    for name in ("teacher", "aligned"):
        assert 0.0 <= on_disk["probe"][name]["macro_recall"] <= 1.0
        assert 0.0 <= on_disk["image"][name]["map"] <= 1.0
    assert summary["probe"]["teacher"]["macro_recall"] == on_disk["probe"]["teacher"]["macro_recall"]
    again = pipeline.run(tiny_config, str(tmp_path))  # every stage is reused: identical numbers
    assert again["probe"] == summary["probe"] and again["maskembed"]["step"] == tiny_config.total_steps


def test_teacher_probe_is_shared_between_runs_only_when_probe_config_matches(tiny_config, tmp_path, monkeypatch):
    first = tmp_path / "first"
    summary = pipeline.run(tiny_config, str(first))
    second = tmp_path / "second"  # an ablation: same teacher and probe, another MaskEmbed setting
    (second / "probe").mkdir(parents=True)
    shutil.copytree(first / "teacher", second / "teacher")
    shutil.copy(first / "probe" / "teacher.json", second / "probe" / "teacher.json")
    shutil.copy(first / "probe" / "aligned.json", second / "probe" / "aligned.json")  # another student's
    probed = []
    real = pipeline.probe_lib.evaluate_backbone
    monkeypatch.setattr(pipeline.probe_lib, "evaluate_backbone",
                        lambda *a, **k: probed.append(1) or real(*a, **k))
    tiny_config.maskembed.decoder_depth = 1
    again = pipeline.run(tiny_config, str(second))
    assert len(probed) == 1  # the aligned student only
    assert again["probe"]["teacher"] == summary["probe"]["teacher"]
    third = tmp_path / "third"  # another probe config: the teacher's probe is not reused
    (third / "probe").mkdir(parents=True)
    shutil.copytree(first / "teacher", third / "teacher")
    shutil.copy(first / "probe" / "teacher.json", third / "probe" / "teacher.json")
    tiny_config.probe.seeds = (1,)
    pipeline.run(tiny_config, str(third))
    assert len(probed) == 3
    fourth = tmp_path / "fourth"  # another teacher (pre-trained longer): its copied probe is not reused
    (fourth / "probe").mkdir(parents=True)
    shutil.copy(third / "probe" / "teacher.json", fourth / "probe" / "teacher.json")
    tiny_config.pretrain.steps += 1
    pipeline.run(tiny_config, str(fourth))
    assert len(probed) == 5


def _main(*args, timeout=240, fake_devices=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if not fake_devices:  # the one CPU device a user's run sees
        env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "lalign.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_rejects_unknown_config_field(tmp_path):
    r = _main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}", "--config.totl_steps=3")
    assert r.returncode != 0 and "totl_steps" in r.stderr


def test_cli_rejects_unknown_config_arg(tmp_path):
    r = _main("--config=configs/demo.py:huge", f"--workdir={tmp_path}")
    assert r.returncode != 0 and "'full', 'smoke' or 'tiny'" in r.stderr


def test_demo_smoke_config_end_to_end(tmp_path):
    """The documented contract (docs/design.md): `configs/demo.py:smoke` runs every stage and writes summary.json."""
    r = _main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}", timeout=900, fake_devices=False)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    for name in ("teacher", "aligned"):
        assert 0.0 < summary["probe"][name]["macro_recall"] <= 1.0
        assert 0.0 < summary["image"][name]["map"] <= 1.0
    assert summary["maskembed"]["step"] == 100 and summary["maskembed"]["best_val_loss"] < 0.5
    assert "patch macro recall" in r.stdout  # the printed table
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert any("images_per_s" in rec for rec in records)


def test_resuming_a_checkpoint_of_another_model_is_a_clear_error(tiny_config, teacher, tmp_path):
    train_maskembed(tiny_config, str(tmp_path), *teacher)
    tiny_config.model.mlp_dim = 48  # another teacher architecture, same workdir
    other = pretrain_teacher(tiny_config, str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"checkpoints/latest/6 does not match this run's model") as e:
        train_maskembed(tiny_config, str(tmp_path), *other)
    # The message names an array that differs, with both shapes.
    assert re.search(r"shape mismatch at 'student/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel': "
                     r"expected \(16, 48\), got \(16, 32\)", str(e.value)), str(e.value)
    assert os.path.isdir(tmp_path / "checkpoints" / "latest" / "6")  # left intact


def test_image_folder_run_normalizes_uint8_on_the_device_as_the_host_did(tiny_config, teacher, tmp_path, monkeypatch):
    """A short run on an image folder: its uint8 batches, normalized inside the step, the validation loss, the
    target statistics and the watch, give what the same run gets from batches normalized on the host (float32, the
    old formula)."""
    from PIL import Image

    from lalign.data.images import NORMALIZATION

    rng = np.random.default_rng(0)
    for i in range(24):
        os.makedirs(tmp_path / "images" / f"c{i % 2}", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"c{i % 2}" / f"{i}.png")
    tiny_config.data = dict(name="image_folder", path=str(tmp_path / "images"), image_size=16, num_val=8,
                            num_workers=2, normalization="clip")
    tiny_config.total_steps, tiny_config.eval_every, tiny_config.val_batches = 2, 2, 1
    tiny_config.watch.source = ""  # agreement on the (uint8) validation batch only: the scenes' watch set is float
    device = train_maskembed(tiny_config, str(tmp_path / "device"), *teacher)

    real_source = data_lib.image_source
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION["clip"])

    class HostNormalized:  # the old pipeline: float32 pixels normalized on the host
        def __init__(self, source):
            self.source = source

        def __getattr__(self, name):
            return getattr(self.source, name)

        def _float(self, b):
            assert b["image"].dtype == np.uint8
            return dict(b, image=(b["image"].astype(np.float32) * np.float32(1 / 255) - mean) / std)

        def batch(self, *args, **kw):
            return self._float(self.source.batch(*args, **kw))

        def examples(self, *args):
            return self._float(self.source.examples(*args))

    monkeypatch.setattr(data_lib, "image_source", lambda *a, **k: HostNormalized(real_source(*a, **k)))
    host = train_maskembed(tiny_config, str(tmp_path / "host"), *teacher)
    assert device["target_std"] == pytest.approx(host["target_std"], rel=1e-5)
    assert device["best_val_loss"] == pytest.approx(host["best_val_loss"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(device["last_params"]), jax.tree.leaves(host["last_params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    records = {name: [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")] for name in ("device", "host")}
    agreement = {name: [r["watch_agreement"] for r in rs if "watch_agreement" in r] for name, rs in records.items()}
    np.testing.assert_allclose(agreement["device"], agreement["host"], rtol=1e-5)
