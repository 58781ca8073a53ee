"""Writing files so that no reader (a resumed run, an export, a person) ever sees half of one.

Each file is written under a temporary name beside its destination and renamed over it once complete: a crash or
an error leaves the previous file, or none. `write_text` takes local paths and bucket URLs alike (etils.epath;
a bucket object appears whole when its upload completes); `write_atomically` is for local writers that take a path
(np.savez, safetensors, a whole export folder).
"""
from __future__ import annotations

import os
import shutil
from typing import Callable

from etils import epath


def write_text(path, text: str) -> None:
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(p)


def write_atomically(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """`write(stage)` writes the output (a file, or a directory) at a staging path beside `path`; only once it is
    complete does it take `path`'s place, and an output it replaces is removed only then. An error or a kill
    leaves the old output, or nothing, never half of one. `suffix`: what the writer insists on (np.savez adds .npz;
    default: `path`'s own .npz / .safetensors extension)."""
    parent, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    ext = suffix or (os.path.splitext(name)[1] if os.path.splitext(name)[1] in (".npz", ".safetensors") else "")
    stage = os.path.join(parent, f".{name}.partial-{os.getpid()}{ext}")
    old = os.path.join(parent, f".{name}.replaced-{os.getpid()}")
    _remove(stage)
    try:
        write(stage)
        if os.path.lexists(path):
            os.replace(path, old)
        os.replace(stage, path)
    except BaseException:
        _remove(stage)
        if os.path.lexists(old) and not os.path.lexists(path):
            os.replace(old, path)  # put the previous output back
        raise
    _remove(old)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def absolute(path: str) -> str:
    """An absolute local path (orbax wants one); a bucket URL (gs://...) as it is."""
    return path if "://" in path else os.path.abspath(path)
