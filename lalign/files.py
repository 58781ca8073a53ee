"""Writing files so that no reader (a resumed run, an export, a person) ever sees half of one.

Each file is written under a temporary name beside its destination and renamed over it once complete: a crash or
an error leaves the previous file, or none. `write_text` takes local paths and bucket URLs alike (etils.epath;
a bucket object appears whole when its upload completes); `write_atomically` is for local writers that take a path
(np.savez, safetensors).
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable

from etils import epath


def write_text(path, text: str) -> None:
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(p)


def write_atomically(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """`write(tmp)` into a temporary file beside `path`, renamed over `path` once complete. `suffix`: what the
    writer insists on (np.savez adds .npz)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def absolute(path: str) -> str:
    """An absolute local path (orbax wants one); a bucket URL (gs://...) as it is."""
    return path if "://" in path else os.path.abspath(path)
