"""MaskEmbed as a real multi-host job: several JAX processes on this machine (JAX's coordination service, gloo
collectives, orbax's multi-host checkpoints, JAX's preemption sync), against one process.

The config is the So400m family at its smoke size on an image folder of JPEG files (`:smoke_folder`: scan,
remat, MAP head, a patch grid that does not cover the image), with fsdp spanning the processes.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lalign import config as config_lib, distributed, rehearse
from lalign.checkpoints.manager import restore_verified

CONFIG = "configs/siglip_so400m.py:smoke_folder"
STEPS = 10
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=4"]
# The jobs' timeouts (joining, heartbeats) and the tests' waits on them grow on a busy machine, where every host
# is slower but the run is no less right: LALIGN_TEST_TIME_SCALE, else the load per core measured at start.
SCALE = min(10.0, float(os.environ.get("LALIGN_TEST_TIME_SCALE") or
                        max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))))


def _overrides(data, *extra):
    return [f"--config.data.path={data}", f"--config.total_steps={STEPS}", "--config.eval_every=5",
            "--config.checkpoint_every=2", "--config.log_every=1", "--config.quiet=False",
            # float32 compute: the comparisons across meshes test the sharding, not bfloat16 rounding
            "--config.maskembed.teacher_dtype=float32", "--config.maskembed.student_dtype=float32", *extra]


def _single(workdir, data, devices, *extra, timeout=300 * SCALE):
    """One process, `devices` CPU devices, no --distributed: what a one-host user runs."""
    cmd = [sys.executable, "-m", "lalign.main", f"--config={CONFIG}", f"--workdir={workdir}",
           *_overrides(data, *extra)]
    r = subprocess.run(cmd, cwd=rehearse.ROOT, env=rehearse.host_env(devices), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _pod(workdir, data, *extra, processes=2, devices=4, heartbeat=20, env=None, suffix=None):
    """`env[i]`: more environment for host i (e.g. distributed.TEST_SIGNAL_ENV)."""
    return rehearse.start_hosts(CONFIG, str(workdir), processes, devices, _overrides(data, *extra),
                                heartbeat_timeout=int(heartbeat * SCALE), distributed_timeout=int(120 * SCALE),
                                log_suffix=suffix or f"_{time.time_ns()}", env=env)


def _logs(workdir):
    d = os.path.join(workdir, "logs")
    return "\n".join(f"--- {f}\n" + open(os.path.join(d, f), errors="replace").read()[-20000:]
                     for f in sorted(os.listdir(d)))


def _finish_pod(workdir, data, *extra):
    codes = rehearse.wait_hosts(_pod(workdir, data, *extra), timeout=300 * SCALE)
    assert codes == [0, 0], _logs(workdir)


def _params(workdir, step=STEPS):
    return restore_verified(os.path.join(workdir, "checkpoints", "latest", str(step)))


def _losses(workdir):
    rows = rehearse.logged_steps(str(workdir))
    return {r["step"]: r["loss"] for r in rows}  # a resumed run logs its steps again: the newest value wins


def _assert_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return rehearse.write_jpeg_folder(str(tmp_path_factory.mktemp("jpegs")), num_images=96)


@pytest.fixture(scope="module")
def pod_run(tmp_path_factory, data):
    """2 processes x 4 devices, mesh (data 2, fsdp 4), uninterrupted."""
    workdir = str(tmp_path_factory.mktemp("pod"))
    _finish_pod(workdir, data, *MESH)
    return workdir


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, data):
    """The same run as 1 process x 8 devices (same mesh) and as 1 process x 1 device."""
    runs = {"1x8": str(tmp_path_factory.mktemp("one8")), "1x1": str(tmp_path_factory.mktemp("one1"))}
    _single(runs["1x8"], data, 8, *MESH)
    _single(runs["1x1"], data, 1, "--config.mesh.data=1", "--config.mesh.fsdp=1")
    return runs


def test_two_processes_equal_one_process(pod_run, single_runs):
    pod = _params(pod_run)
    for name, workdir in single_runs.items():
        other = _params(workdir)
        _assert_close(pod["params"], other["params"], atol=1e-6)
        # the target statistics: measured sharded over both processes' rows == measured in one process
        np.testing.assert_allclose(pod["target_std"], other["target_std"], rtol=1e-6)
        a, b = _losses(pod_run), _losses(workdir)
        assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), name
        np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5, err_msg=name)


def test_each_host_builds_and_reads_only_its_rows(pod_run, single_runs):
    hosts = rehearse.host_reports(pod_run, 2)
    assert [h["batch_rows"] for h in hosts] == [[0, 4], [4, 8]]
    assert all(h["outcome"] == "finished" and h["step"] == STEPS and h["local_devices"] == 4 for h in hosts)
    (single,) = rehearse.host_reports(single_runs["1x8"], 1)
    assert single["batch_rows"] == [0, 8]
    # Each host decodes its half of every batch (target statistics, steps, the last prefetch): half the files
    # one process reads; the two halves are different rows (test_data checks the row -> file mapping).
    assert hosts[0]["train_files_read"] == hosts[1]["train_files_read"] == single["train_files_read"] // 2 > 0
    # process 0 alone writes the metrics: one record per step, not one per host
    assert len(rehearse.logged_steps(pod_run)) == STEPS


def test_sigterm_at_different_moments_saves_one_step_and_resumes_exactly(pod_run, single_runs, data,
                                                                         tmp_path):
    workdir = str(tmp_path / "pod")
    # The preemption reaches host 0 at step 3 and host 1 at step 4 (each sends itself SIGTERM there).
    procs = _pod(workdir, data, *MESH, env={i: {distributed.TEST_SIGNAL_ENV: f"{3 + i}:SIGTERM"} for i in range(2)})
    codes = rehearse.wait_hosts(procs, timeout=300 * SCALE)
    hosts = rehearse.host_reports(workdir, 2)
    assert codes == [143, 143], _logs(workdir)
    saved = {h["step"] for h in hosts}
    assert len(saved) == 1 and all(h["outcome"] == "preempted" for h in hosts), hosts
    (step,) = saved
    assert 4 <= step < STEPS  # not before the later host got its signal
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "latest", str(step)))
    preempted = str(tmp_path / "preempted")
    shutil.copytree(workdir, preempted)

    _finish_pod(workdir, data, *MESH)  # all hosts again: resumes
    assert {h["resumed_from"] for h in rehearse.host_reports(workdir, 2)} == {step}
    for a, b in zip(jax.tree.leaves(_params(pod_run)["params"]), jax.tree.leaves(_params(workdir)["params"])):
        np.testing.assert_array_equal(a, b)

    # Elastic: the 2 x 4 checkpoint resumed on one process with 8 devices and with 2 (fsdp 2): orbax restores into
    # the new shardings, the data order is a function of the global step: the uninterrupted run, up to rounding.
    for devices, mesh, reference in ((8, MESH, "1x8"), (2, ["--config.mesh.data=1", "--config.mesh.fsdp=2"], "1x1")):
        elastic = str(tmp_path / f"elastic{devices}")
        shutil.copytree(preempted, elastic)
        r = _single(elastic, data, devices, *mesh)
        assert "resumed from" in r.stdout and f"at step {step}" in r.stdout, r.stdout[-2000:]
        # process 0 clears the 2-host run's reports: process_1.json's "preempted" is not this run's
        assert os.listdir(os.path.join(elastic, "hosts")) == ["process_0.json"]
        assert rehearse.host_reports(elastic, 1)[0]["outcome"] == "finished"
        _assert_close(_params(elastic)["params"], _params(single_runs[reference])["params"], atol=1e-6)


def test_sigkill_of_one_host_stops_the_other_with_a_message_and_a_restart_resumes(pod_run, data, tmp_path):
    workdir = str(tmp_path / "pod")
    # Host 1 is killed at step 5 (it sends itself SIGKILL there); step 2 is saved, step 4 is saved or in flight.
    procs = _pod(workdir, data, *MESH, env={1: {distributed.TEST_SIGNAL_ENV: "5:SIGKILL"}}, suffix="_killed")
    code = procs[0].wait(timeout=300 * SCALE)  # bounded: the failed collective, or at worst the heartbeat timeout
    rehearse.wait_hosts(procs, timeout=10)
    assert procs[1].returncode == -signal.SIGKILL, _logs(workdir)
    survivor = open(os.path.join(workdir, "logs", "host_0_killed.log"), errors="replace").read()
    assert code == distributed.LOST_HOST_EXIT, survivor[-5000:]
    # One line says what happened, and it is the survivor's last: no native crash report before or after it.
    line = re.search(r"\[distributed\] host 1 stopped sending heartbeats; the run stops; restart all hosts to "
                     r"resume from step (\d+) \(this host 0 saw: .*\)", survivor)
    assert line and survivor.rstrip().endswith(line.group(0)), survivor[-5000:]
    assert not re.search(r"^[EF]\d{4} |Traceback|terminate called|Fatal Python", survivor[:line.start()], re.M), \
        survivor[-5000:]
    assert "[maskembed] step 10/10" not in survivor  # stopped mid-run, not after finishing
    saved = int(line.group(1))

    _finish_pod(workdir, data, *MESH)
    assert {h["resumed_from"] for h in rehearse.host_reports(workdir, 2)} == {saved} and saved >= 2
    _assert_close(_params(workdir)["params"], _params(pod_run)["params"], atol=0)
    # metrics.jsonl: the steps after `saved` logged before the kill are dropped at the restart, not kept twice
    assert [r["step"] for r in rehearse.logged_steps(workdir)] == list(range(1, STEPS + 1))


def _fails_clearly(procs, workdir, expected, timeout=120):
    start = time.time()
    codes = rehearse.wait_hosts(procs, timeout=timeout * SCALE, grace=30 * SCALE)
    logs = _logs(workdir)
    assert all(c != 0 for c in codes), logs
    assert time.time() - start < timeout * SCALE, logs
    assert expected in logs, logs
    return logs


def test_hosts_with_different_configs_refuse_to_start(data, tmp_path):
    workdir = str(tmp_path)
    port = rehearse.free_port()
    procs = [rehearse.start_hosts(CONFIG, workdir, 2, 1, _overrides(data, f"--config.seed={i}"), port=port,
                                  only=i, log_suffix=f"_{i}")[0] for i in range(2)]
    _fails_clearly(procs, workdir, "The hosts were started with different configs")
    assert not os.path.exists(os.path.join(workdir, "config.json"))  # nothing written


def test_process_count_that_does_not_fit_the_mesh_is_a_clear_error(data, tmp_path):
    procs = rehearse.start_hosts(CONFIG, str(tmp_path), 2, 1, _overrides(data, "--config.mesh.fsdp=4"))
    _fails_clearly(procs, str(tmp_path), "2 devices (2 processes x 1) are not divisible by 4")


def test_unreachable_coordinator_fails_in_bounded_time(tmp_path):
    port = rehearse.free_port()  # nobody listens there
    cmd = [sys.executable, "-m", "lalign.main", "--config=configs/siglip_so400m.py:smoke", f"--workdir={tmp_path}",
           "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
           "--distributed_timeout=5"]
    start = time.time()
    r = subprocess.run(cmd, cwd=rehearse.ROOT, env=rehearse.host_env(1), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and time.time() - start < 90, r.stderr[-3000:]
    assert f"could not join the job at 127.0.0.1:{port} as process 1 of 2 within 5s" in r.stderr, r.stderr[-3000:]


# ------------------------------------------------------------------------- in one process (8 fake devices)
def test_sigterm_during_a_save_exits_143_with_that_step_readable(tiny_config, tmp_path, monkeypatch):
    from lalign.checkpoints import manager
    from lalign.pretrain import pretrain_teacher
    from lalign.train import train_maskembed

    teacher = pretrain_teacher(tiny_config, str(tmp_path / "teacher"))
    tiny_config.update(total_steps=8, checkpoint_every=2, eval_every=4)
    real_save = manager.Checkpoints.save

    def save_then_sigterm(self, step, state, val_loss=None):
        real_save(self, step, state, val_loss)
        if step == 4:  # the preemption lands while step 4 is being evaluated and saved
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(manager.Checkpoints, "save", save_then_sigterm)
    with pytest.raises(SystemExit) as stopped:  # not orbax's "step 4 already exists"
        train_maskembed(tiny_config, str(tmp_path / "run"), *teacher)
    assert stopped.value.code == 143
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints" / "latest")) == ["2", "4"]  # 4 saved once
    assert int(_params(str(tmp_path / "run"), 4)["step"]) == 4
    assert json.load(open(tmp_path / "run" / "hosts" / "process_0.json"))["outcome"] == "preempted"


def test_whitened_targets_train_and_validate_with_fsdp(tiny_config, tmp_path):
    from lalign.pretrain import pretrain_teacher
    from lalign.train import train_maskembed

    teacher = pretrain_teacher(tiny_config, str(tmp_path / "teacher"))
    tiny_config.update(total_steps=2, eval_every=1, checkpoint_every=2)
    tiny_config.maskembed.whiten_targets = True
    runs = {}
    for name, mesh in (("fsdp", dict(data=2, fsdp=4)), ("replicated", dict(data=8, fsdp=1))):
        tiny_config.mesh = dict(mesh, tensor=1, num_devices=0)
        runs[name] = train_maskembed(tiny_config, str(tmp_path / name), *teacher)
        assert runs[name]["step"] == 2
    # The whitening (estimated, saved, applied in the step and in validation) is the same, sharded or not.
    saved = {name: _params(str(tmp_path / name), 2)["target_whitening"] for name in runs}
    assert saved["fsdp"]["matrix"].shape == (tiny_config.model.width,) * 2
    _assert_close(saved["fsdp"], saved["replicated"], atol=5e-5)  # entries up to ~4: float32 sums in two orders
    assert runs["fsdp"]["best_val_loss"] == pytest.approx(runs["replicated"]["best_val_loss"], rel=1e-4)
    _assert_close(runs["fsdp"]["last_params"], runs["replicated"]["last_params"], atol=1e-5)


def test_host_shard_is_read_from_the_batch_sharding():
    from lalign import sharding

    for mesh_cfg in (dict(data=2, fsdp=4), dict(data=1, fsdp=8), dict(data=-1, fsdp=2, tensor=2)):
        assert sharding.host_shard(16, sharding.make_mesh(mesh_cfg)) == (0, 1)  # one process holds every row
    with pytest.raises(ValueError, match="config.batch_size 6 is not divisible by the 8 batch shards"):
        sharding.host_shard(6, sharding.make_mesh(dict(data=2, fsdp=4)))


def test_distributed_settings_from_flags_then_environment():
    from lalign import distributed

    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve(environ={}) == {}  # nothing given: JAX's cluster auto-detection
    assert distributed.resolve(environ=env) == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                                                "process_id": 3}
    assert distributed.resolve("127.0.0.1:9", 2, 0, environ=env) == {"coordinator_address": "127.0.0.1:9",
                                                                     "num_processes": 2, "process_id": 0}
    with pytest.raises(ValueError, match=r"not --num_processes \(or JAX_NUM_PROCESSES\), --process_id"):
        distributed.resolve("127.0.0.1:9", environ={})
    with pytest.raises(ValueError, match="--process_id 2 is outside 0..1"):
        distributed.resolve("127.0.0.1:9", 2, 2, environ={})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='x' is not an integer"):
        distributed.resolve(environ=dict(env, JAX_PROCESS_ID="x"))


def test_a_host_builds_and_reads_only_its_rows_of_an_image_folder(data):
    from lalign import data as data_lib

    cfg = config_lib.load(CONFIG).data
    cfg.update(path=data, prefetch=False)
    whole = data_lib.image_source(cfg, "maskembed").batch(3, 8)
    for i in range(2):
        source = data_lib.image_source(cfg, "maskembed")
        part = source.batch(3, 8, (i, 2))
        assert source.num_read == 4  # its 4 files, not the batch's 8
        np.testing.assert_array_equal(part["index"], whole["index"][4 * i:4 * (i + 1)])
        np.testing.assert_array_equal(part["image"], whole["image"][4 * i:4 * (i + 1)])


def test_the_demo_pipeline_runs_as_two_processes(tmp_path):
    """Teacher pre-training (saved from every host's identical copy), MaskEmbed, then the probes on each host's
    own devices: one summary, written once."""
    workdir = str(tmp_path)
    procs = rehearse.start_hosts("configs/demo.py:tiny", workdir, 2, 4, ["--config.total_steps=4"],
                                 heartbeat_timeout=int(20 * SCALE), distributed_timeout=int(120 * SCALE))
    assert rehearse.wait_hosts(procs, timeout=400 * SCALE) == [0, 0], _logs(workdir)
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["maskembed"]["step"] == 4
    assert {"teacher", "aligned"} <= set(summary["probe"])
    assert _logs(workdir).count("patch macro recall") == 3  # two probe lines and the table header, on process 0 only
