"""Every command line behaves the same way: --help exits 0 with the usage; a user error is one line
`lalign.<tool>: error: ...` and exit code 2, never a traceback."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("main", "probe", "bench", "memory", "export", "report")


def _run(*args):
    env = dict(os.environ, LALIGN_TCMALLOC="0")
    env.pop("LALIGN_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_exits_zero_with_the_usage(tool):
    r = _run(f"lalign.{tool}", "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--" in r.stdout + r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (("lalign.main", "--config=configs/demo.py:smoke", "--workdir=/tmp/x", "--nosuchflag=1"),
     "lalign.main: error: Unknown command line flag 'nosuchflag'"),
    (("lalign.main", "--config=configs/nosuch.py", "--workdir=/tmp/x"),
     "lalign.main: error: --config: Failed loading config file"),
    (("lalign.main", "--config=configs/demo.py:huge", "--workdir=/tmp/x"),
     "configs/demo.py takes 'full', 'smoke' or 'tiny', got 'huge'"),
    (("lalign.memory", "--config=configs/clip_b16.py", "--config.model.nosuch=1"),
     "lalign.memory: error: the config has no field"),
    (("lalign.export", "--input", "/nonexistent.npz", "--output", "/tmp/o.npz", "--to", "bigvision"),
     "lalign.export: error: No npz checkpoint at /nonexistent.npz"),
    (("lalign.report", "--workdirs", "/nonexistent", "--out", "/tmp/r"), "lalign.report: error:"),
])
def test_a_user_error_is_one_line_and_exit_code_2(args, message):
    r = _run(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(lines) == 1 and message in lines[0], r.stderr[-2000:]
