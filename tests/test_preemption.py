"""A real run killed mid-way (SIGKILL, or SIGTERM = preemption) and restarted in the same workdir ends with
parameters bit-identical to an uninterrupted run, and its data order continues rather than restarts."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lalign.checkpoints.load import restore_verified

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/demo.py:tiny", "--config.stages=('pretrain','maskembed')", "--config.total_steps=30",
        "--config.checkpoint_every=5", "--config.eval_every=0", "--config.log_every=1",
        "--config.async_checkpointing=True"]


def _start(workdir):
    return subprocess.Popen([sys.executable, "-m", "lalign.main", f"--workdir={workdir}", *ARGS], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _maskembed_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r["step"] for r in map(json.loads, f) if r.get("stage") == "maskembed" and "loss" in r]


def _run_until(workdir, step, sig):
    proc = _start(workdir)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(s >= step for s in _maskembed_steps(workdir)):
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=240)
    return proc.returncode, out


def _finish(workdir):
    proc = _start(workdir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _final_params(workdir):
    return restore_verified(os.path.join(workdir, "checkpoints", "latest", "30"))["params"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    _finish(workdir)
    return _final_params(workdir)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_and_restarted_run_equals_uninterrupted(uninterrupted, tmp_path, sig):
    workdir = str(tmp_path)
    code, out = _run_until(workdir, 12, sig)
    assert code != 0, "the run should have been stopped mid-way"
    if sig == signal.SIGTERM:
        assert code == 143 and "SIGTERM: saved step" in out, out[-2000:]
    steps_before = _maskembed_steps(workdir)
    out = _finish(workdir)
    assert "resumed from" in out
    steps = _maskembed_steps(workdir)[len(steps_before):]
    assert steps and steps[0] > 1 and steps[-1] == 30  # continued, not restarted from step 1
    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(_final_params(workdir))):
        np.testing.assert_array_equal(a, b)
