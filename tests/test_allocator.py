"""lalign.allocator: entry points re-run themselves once with tcmalloc preloaded; the reason is real."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from lalign import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What an entry point does: one line before `use_tcmalloc()` (printed again if the command re-runs), then a report.
_ENTRY = textwrap.dedent("""
    import json, os, sys
    from lalign import allocator
    print("started", flush=True)
    allocator.use_tcmalloc()
    print(json.dumps({"allocator": allocator.describe(), "argv": sys.argv[1:], "cwd": os.getcwd(),
                      "ld_preload": os.environ.get("LD_PRELOAD", "")}))
""")


def _run_entry(tmp_path, env_update, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LALIGN_TCMALLOC")}
    env.update(env_update, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", _ENTRY, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def _standin_library(tmp_path):
    """A copy of this process's libm named like tcmalloc: preloading it is harmless, and /proc/self/maps shows
    the copy's name, so the re-run can be checked on machines without tcmalloc."""
    with open("/proc/self/maps") as f:
        libm = next(line.split()[-1] for line in f if os.path.basename(line.split()[-1]).startswith("libm.so"))
    copy = tmp_path / "libtcmalloc_standin.so"
    shutil.copy(libm, copy)
    return str(copy)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc/self/maps are Linux's")
def test_entry_point_reruns_once_with_the_library_preloaded_and_the_same_arguments(tmp_path):
    library = _standin_library(tmp_path)
    proc = _run_entry(tmp_path, {"LALIGN_TCMALLOC": library, "LD_PRELOAD": ""}, "--config=x.py", "two words")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines.count("started") == 2, proc.stdout  # the original process and exactly one re-run
    report = json.loads(lines[-1])
    assert report["allocator"] == f"tcmalloc ({library})"
    assert report["argv"] == ["--config=x.py", "two words"]
    assert report["cwd"] == str(tmp_path)
    assert report["ld_preload"] == library


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc/self/maps are Linux's")
def test_opting_out_and_a_missing_library(tmp_path):
    proc = _run_entry(tmp_path, {"LALIGN_TCMALLOC": "0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines().count("started") == 1
    assert json.loads(proc.stdout.splitlines()[-1])["allocator"] == "system malloc"

    missing = str(tmp_path / "no" / "libtcmalloc.so.4")
    proc = _run_entry(tmp_path, {"LALIGN_TCMALLOC": missing})
    assert proc.returncode != 0
    assert f"LALIGN_TCMALLOC={missing!r}: no such file" in proc.stderr


_PAGE_FAULTS = textwrap.dedent("""
    import resource, jax, jax.numpy as jnp
    from lalign import allocator
    allocator.use_tcmalloc()
    x = jnp.ones((16 * 2**20,))  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    f = jax.jit(lambda x: x * 2 + 1)
    for _ in range(3):  # the allocator's pools reach their steady size
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        f(x).block_until_ready()
    print(allocator.describe(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


@pytest.mark.skipif(allocator.find() is None, reason="tcmalloc is not installed (scripts/install.sh installs it "
                    "as root on Debian/Ubuntu)")
def test_tcmalloc_stops_xla_cpu_from_page_faulting_each_call_again(tmp_path):
    """The reason for the module: with glibc every call faults in its 64 MiB output anew (16,384 pages of 4 KiB);
    with tcmalloc the freed pages are reused."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LALIGN_TCMALLOC", "XLA_FLAGS")}
    faults = {}
    for choice in ("0", "auto"):
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], env=dict(env, LALIGN_TCMALLOC=choice,
                             PYTHONPATH=REPO), capture_output=True, text=True, timeout=300, check=True).stdout
        name, per_call = out.strip().splitlines()[-1].rsplit(" ", 1)
        faults[name.split(" ")[0]] = float(per_call)
    assert set(faults) == {"system", "tcmalloc"}, faults
    assert faults["system"] > 8000, faults  # most of the 16,384 pages, every call
    assert faults["tcmalloc"] < faults["system"] / 4, faults  # seen: 0 in most runs, one refill in 10 calls
