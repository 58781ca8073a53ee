"""tcmalloc for the host process: the entry points re-run themselves with it when it is installed.

Why: XLA:CPU allocates a step's buffers afresh on every call and frees them after. glibc malloc serves large
blocks with freshly mapped pages and unmaps them on free, so every step page-faults all of its activations again.
A jitted elementwise op on 64 MiB took 37 ms with glibc (16,384 minor page faults per call: every page) and 7 ms
with tcmalloc (none), which keeps freed pages mapped for the next step. Whole MaskEmbed steps on a 2-core CPU VM:
the demo model 1.8x faster, ViT-B/16 1.3x (docs/performance.md, "The allocator (tcmalloc)"). glibc's own knobs
(MALLOC_MMAP_MAX_=0, a high trim threshold, one arena) recovered less than half of the B/16 gain; jemalloc's
defaults none of it.

The allocator is fixed when the process starts, so the CLIs (`python -m lalign.main`, `lalign.bench`,
`lalign.probe`) call `use_tcmalloc()` before anything else: if tcmalloc is installed but not loaded, it runs the
same command again (`os.execve`, same arguments and environment) with tcmalloc in LD_PRELOAD. On TPU and GPU
hosts the step's memory is the accelerator's, so this matters little there; TPU VM images often preload tcmalloc
anyway.

    LALIGN_TCMALLOC unset or "auto"   preload tcmalloc when it is found (Debian/Ubuntu: libtcmalloc-minimal4)
    LALIGN_TCMALLOC=0                 leave the allocator alone
    LALIGN_TCMALLOC=/path/to/lib.so   preload that library (an error if it does not exist)
"""
from __future__ import annotations

import ctypes.util
import os
import sys

_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
         "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
_REEXEC_MARK = "_LALIGN_TCMALLOC_REEXEC"  # set in the re-run process: never re-run twice


def loaded() -> str | None:
    """Path of the tcmalloc library mapped into this process, or None (glibc malloc, or not Linux)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if "libtcmalloc" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


def find() -> str | None:
    """Path of an installed tcmalloc shared library, or None."""
    for directory in _DIRS:
        for name in _NAMES:
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)  # a bare soname: the dynamic loader resolves it in LD_PRELOAD
        if found:
            return found
    return None


def describe() -> str:
    """"tcmalloc (PATH)" or "system malloc": what benchmarks and logs report, since it changes CPU step times."""
    path = loaded()
    return f"tcmalloc ({path})" if path else "system malloc"


def library_to_preload() -> str | None:
    """The tcmalloc library this process should preload per LALIGN_TCMALLOC (module docstring), or None: opted
    out, not Linux, already loaded, or none installed."""
    choice = os.environ.get("LALIGN_TCMALLOC", "auto").strip()
    if choice == "0" or not sys.platform.startswith("linux") or loaded():
        return None
    if choice in ("", "auto", "1"):
        return find()
    if not os.path.exists(choice):
        raise FileNotFoundError(f"LALIGN_TCMALLOC={choice!r}: no such file. Point it at a tcmalloc shared "
                                "library, or set LALIGN_TCMALLOC=0 to keep the system allocator.")
    return choice


def use_tcmalloc() -> None:
    """Re-runs this process's command with tcmalloc preloaded, when it is installed and not loaded yet.

    Call it first in an entry point, before JAX starts threads or touches a device: nothing that happened
    before the call survives the re-run. Returns without doing anything where that is not possible or wanted
    (see the module docstring); does not return when it re-runs the command."""
    library = library_to_preload()
    if library is None:
        return
    if os.environ.get(_REEXEC_MARK):  # preloaded and still not loaded (e.g. a library it could not load)
        print(f"lalign: {library} was preloaded but is not loaded; going on with the system allocator.",
              file=sys.stderr, flush=True)
        return
    env = dict(os.environ, **{_REEXEC_MARK: "1"})
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))  # no report per multi-GB step buffer
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
