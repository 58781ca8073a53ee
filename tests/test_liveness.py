"""The lost-host watchdog in a real two-process JAX job (coordination service, gloo): a host killed while the
other is busy outside any collective (saving, evaluating, loading data) is named in one line, before JAX's own
heartbeat check aborts the survivor with a native crash report; a host that simply ends first is not lost."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

from lalign import distributed, rehearse

# JAX and the watchdog both count from the heartbeat timeout; on a busy machine both grow together.
SCALE = min(10.0, float(os.environ.get("LALIGN_TEST_TIME_SCALE") or
                        max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))))
HEARTBEAT = int(12 * SCALE)

HOST = textwrap.dedent("""
    import os, signal, sys, time
    from lalign import distributed
    process_id, port, heartbeat, plan = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    distributed.initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout_s=120,
                           heartbeat_timeout_s=heartbeat)
    print("joined", flush=True)
    with distributed.StopIfHostLost(lambda: "step 7"):
        if process_id == 1:
            time.sleep(2)
            if plan == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            sys.exit(0)  # "end": this host is done early, the other goes on
        # host 0: busy in Python, in no collective, for longer than the watchdog's quiet limit
        time.sleep(float(sys.argv[5]))
    print("host 0 finished", flush=True)
""")


def _job(tmp_path, plan, busy_s):
    script = tmp_path / "host.py"
    script.write_text(HOST)
    port = rehearse.free_port()
    return [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(HEARTBEAT), plan, str(busy_s)],
                             cwd=rehearse.ROOT, env=rehearse.host_env(1), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def test_a_host_killed_while_the_other_is_outside_a_collective_is_named_in_one_line(tmp_path):
    procs = _job(tmp_path, "kill", busy_s=HEARTBEAT * 4)  # JAX alone would abort host 0 after ~HEARTBEAT s
    start = time.time()
    out, _ = procs[0].communicate(timeout=HEARTBEAT * 6)
    procs[1].wait(timeout=30)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == distributed.LOST_HOST_EXIT, out[-5000:]
    line = re.search(r"\[distributed\] host 1 stopped sending heartbeats; the run stops; restart all hosts to "
                     r"resume from step 7 \(this host 0 saw: no sign of life for \d+ s\)", out)
    assert line and out.rstrip().endswith(line.group(0)), out[-5000:]
    assert not re.search(r"^[EF]\d{4} |Traceback|terminate called|Fatal Python|Check failure", out, re.M), out
    assert time.time() - start < HEARTBEAT * 2, out  # before JAX's heartbeat check, not after


def test_a_host_that_ends_first_is_not_taken_for_a_lost_one(tmp_path):
    procs = _job(tmp_path, "end", busy_s=HEARTBEAT * 0.6)  # past the watchdog's limit (a third), short of JAX's
    out0, _ = procs[0].communicate(timeout=HEARTBEAT * 6)
    out1, _ = procs[1].communicate(timeout=60 * SCALE)
    assert procs[0].returncode == 0 and "host 0 finished" in out0, out0[-5000:]
    assert procs[1].returncode == 0, out1[-5000:]
    assert "stopped sending heartbeats" not in out0 + out1
