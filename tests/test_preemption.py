"""A real run killed mid-way (SIGKILL, or SIGTERM = preemption) and restarted in the same workdir ends with
parameters bit-identical to an uninterrupted run, and its data order continues rather than restarts."""
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from lalign import distributed
from lalign.checkpoints.manager import restore_verified

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/demo.py:tiny", "--config.stages=('pretrain','maskembed')", "--config.total_steps=30",
        "--config.checkpoint_every=5", "--config.eval_every=0", "--config.log_every=1",
        "--config.async_checkpointing=True"]


def _start(workdir, env=None):
    return subprocess.Popen([sys.executable, "-m", "lalign.main", f"--workdir={workdir}", *ARGS], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def _maskembed_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r["step"] for r in map(json.loads, f) if r.get("stage") == "maskembed" and "loss" in r]


def _run_until(workdir, step, sig):
    """The run sends itself `sig` at the boundary of `step` (a test hook): the same step however busy the
    machine is."""
    proc = _start(workdir, {distributed.TEST_SIGNAL_ENV: f"{step}:{sig.name}"})
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def _finish(workdir):
    proc = _start(workdir)
    out, _ = proc.communicate(timeout=600)
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
    assert code == (143 if sig == signal.SIGTERM else -signal.SIGKILL), out[-2000:]
    if sig == signal.SIGTERM:
        assert "SIGTERM: saved step 12" in out, out[-2000:]
    assert _maskembed_steps(workdir) == list(range(1, 13))
    out = _finish(workdir)
    resumed = re.search(r"resumed from \S+ at step (\d+)", out)
    assert resumed and int(resumed.group(1)) in ((12,) if sig == signal.SIGTERM else (5, 10)), out[-2000:]
    # continued, not restarted from step 1; the steps after the checkpoint logged before the kill are not kept
    # twice in metrics.jsonl
    assert _maskembed_steps(workdir) == list(range(1, 31))
    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(_final_params(workdir))):
        np.testing.assert_array_equal(a, b)
