"""`python -m lalign.rehearse`'s driver on a fake job: the hosts' processes, exit codes and reports are stand-ins
(tests/test_pod.py runs real hosts), so what is checked is how the rehearsal starts, preempts, restarts and judges
them, in seconds."""
import json
import os

import pytest

from lalign import rehearse

CONFIG = "configs/demo.py:smoke"  # its own data: no image folder is written


class FakeJob:
    """Stands in for the hosts: each start writes every host's report as `outcomes[start]` says ((outcome,
    step, resumed_from) per host) and `wait_hosts` answers `codes[start]`."""

    def __init__(self, monkeypatch, workdir, outcomes, codes, sigterm_logged=True):
        self.workdir, self.outcomes, self.codes, self.starts = workdir, outcomes, codes, []
        monkeypatch.setattr(rehearse, "start_hosts", self.start_hosts)
        monkeypatch.setattr(rehearse, "wait_hosts", lambda procs, timeout: self.codes[procs])
        monkeypatch.setattr(rehearse, "sigterm_when", lambda procs, workdir, step, timeout: sigterm_logged)
        monkeypatch.setattr(rehearse, "logged_steps", lambda workdir: [{"images_per_s": 10.0}, {"images_per_s": 8.0}])

    def start_hosts(self, config, workdir, processes, devices, overrides, log_suffix=""):
        start = len(self.starts)
        self.starts.append((config, workdir, processes, devices, list(overrides), log_suffix))
        os.makedirs(os.path.join(workdir, "hosts"), exist_ok=True)
        os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
        for i, (outcome, step, resumed) in enumerate(self.outcomes[start]):
            with open(os.path.join(workdir, "hosts", f"process_{i}.json"), "w") as f:
                json.dump({"process": i, "outcome": outcome, "step": step, "resumed_from": resumed}, f)
            with open(os.path.join(workdir, "logs", f"host_{i}{log_suffix}.log"), "w") as f:
                f.write(f"host {i} log line\n")
        return start  # the "processes": which start they are


def test_a_preempted_job_that_resumes_everywhere_is_ok(monkeypatch, tmp_path, capsys):
    job = FakeJob(monkeypatch, str(tmp_path), codes=[[143, 143], [0, 0]],
                  outcomes=[[("preempted", 3, None)] * 2, [("finished", 6, 3)] * 2])
    assert rehearse.main(["--processes", "2", "--devices", "3", "--steps", "6", "--sigterm-at", "3", "--config",
                          CONFIG, "--workdir", str(tmp_path), "--", "--config.seed=4"]) == 0
    overrides = ["--config.total_steps=6", "--config.mesh.data=-1", "--config.mesh.fsdp=6", "--config.seed=4"]
    assert job.starts == [(CONFIG, str(tmp_path), 2, 3, overrides, ""),
                          (CONFIG, str(tmp_path), 2, 3, overrides, "_restart")]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"[rehearsal] 2 processes x 3 devices, mesh fsdp=6, 6 steps, config {CONFIG}, data the "
                      f"config's own, workdir {tmp_path}")
    assert out[1] == "[rehearsal] SIGTERM at step 3: exit codes [143, 143], saved steps [3, 3]"
    assert out[2].startswith("[rehearsal] host 0: finished at step 6, None devices, batch rows None, resumed from 3")
    assert out[-1].startswith("pod rehearsal OK | 2 hosts x 3 devices | 6 steps | 8 images/s | resumed from step 3 |")
    assert len(out) == 5  # no log tails: every host finished


def test_hosts_that_save_different_steps_fail_without_a_restart(monkeypatch, tmp_path, capsys):
    job = FakeJob(monkeypatch, str(tmp_path), codes=[[143, 0]],
                  outcomes=[[("preempted", 3, None), ("finished", 6, None)]])
    assert rehearse.main(["--processes", "2", "--devices", "1", "--steps", "6", "--sigterm-at", "3", "--config",
                          CONFIG, "--workdir", str(tmp_path), "--fsdp", "1"]) == 1
    assert len(job.starts) == 1  # not restarted
    out = capsys.readouterr().out
    assert ("pod rehearsal FAILED: after SIGTERM the hosts exited [143, 0], not 143 each; the hosts did not all save "
            "one step: [('preempted', 3), ('finished', 6)]; host 0 did not finish: preempted at step 3 | ") in out


def test_a_job_whose_hosts_fail_reports_their_exit_codes(monkeypatch, tmp_path, capsys):
    FakeJob(monkeypatch, str(tmp_path), codes=[[0, 0, 0, 1]], sigterm_logged=False,
            outcomes=[[("finished", 4, None)] * 3 + [("crashed", 2, None)]])
    assert rehearse.main(["--processes", "4", "--devices", "1", "--steps", "4", "--config", CONFIG, "--workdir",
                          str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "mesh fsdp=2," in out  # 2 x devices: fsdp spans processes
    assert ("pod rehearsal FAILED: hosts exited [0, 0, 0, 1]; host 3 did not finish: crashed at step 2 | 4 hosts x 1 "
            "devices | 4 steps | 8 images/s | resumed from step - |") in out
    assert "\n    host 3 log line\n" in out  # the tail of the log of the host that did not finish


@pytest.mark.parametrize("args,message", [
    (["--processes", "0"], "--processes, --devices and --steps must be positive"),
    (["--steps", "5", "--sigterm-at", "5"], "--sigterm-at must be between 1 and 4"),
    (["--config", CONFIG, "--data", "/somewhere"], f"--data: {CONFIG} does not read an image folder"),
])
def test_option_errors(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rehearse.main([*args, "--workdir", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err
