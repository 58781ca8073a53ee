"""One run per workdir: `workdir/lock.json` names its owner (host, pid, start time, command).

Two runs in one workdir interleave their metrics and overwrite each other's checkpoints; the lock makes the
second one refuse at once, naming the first. It is taken before anything is written (by process 0 of a
multi-host run, which tells the other hosts the outcome) and released when the run ends, however it ends short
of SIGKILL. A lock left by a run that was killed is taken over with a message when its owner is provably gone:
the same host and a pid that no longer runs (or a reboot since), or no heartbeat (the owner rewrites the file every
`HEARTBEAT_S`) for `STALE_S` — what a preempted VM on another host leaves behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import Optional

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from lalign import files

HEARTBEAT_S = 60
STALE_S = 15 * 60


class WorkdirBusy(ValueError):
    """Another live run owns the workdir."""


def _boot_id() -> str:
    """Changes at every boot: a lock from before a reboot (a preempted VM recreated under its old name) is stale
    even if its pid now belongs to another process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return (f"host {owner.get('host')}, pid {owner.get('pid')}, started {started}, command "
            f"{' '.join(owner.get('command', []))!r}")


class WorkdirLock:
    """`with WorkdirLock(workdir):` — raises WorkdirBusy if another live run holds it."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = epath.Path(workdir) / "lock.json"
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.note: Optional[str] = None  # what happened to a stale lock, for the run's log
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._me = {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "started": time.time(),
                    "command": [os.path.basename(sys.executable)] + sys.argv}

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # half-written or unreadable: treat as a lock of unknown owner
            return {"host": "?", "pid": -1, "started": 0, "heartbeat": 0}

    def _stale(self, owner: dict) -> Optional[str]:
        if owner.get("host") == self._me["host"]:
            if owner.get("boot", self._me["boot"]) != self._me["boot"]:
                return "this host has rebooted since"
            if not _alive(int(owner.get("pid", -1))):
                return f"its process {owner.get('pid')} on this host is gone"
        age = time.time() - float(owner.get("heartbeat", owner.get("started", 0)))
        if age > self.stale_s:
            return f"it has not been renewed for {age / 60:.0f} minutes"
        return None

    def _write(self, exclusive: bool) -> bool:
        record = json.dumps(dict(self._me, heartbeat=time.time()))
        local = "://" not in str(self.path)
        if exclusive and local:  # atomic create: of two runs starting together exactly one wins
            try:
                fd = os.open(str(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(record)
            return True
        if exclusive and self.path.exists():  # a bucket has no atomic create: look first (a small race window)
            return False
        files.write_text(self.path, record)
        return True

    def acquire(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._write(exclusive=True):
                break
            owner = self._read()
            if owner is None:
                continue  # released meanwhile
            why = self._stale(owner)
            if why is None:
                raise WorkdirBusy(f"{self.path.parent} is in use by another run ({_describe(owner)}). Wait for it "
                                  f"to finish, stop it, or use another --workdir (if that run is gone, delete "
                                  f"{self.path}).")
            self.note = f"took over the lock of an earlier run ({_describe(owner)}): {why}"
            self.path.unlink(missing_ok=True)
        else:
            raise WorkdirBusy(f"Could not take {self.path}: other runs keep taking it.")
        self._thread = threading.Thread(target=self._beat, name="lalign-workdir-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(self.heartbeat_s):
            if self._mine(self._read()):
                self._write(exclusive=False)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._mine(self._read()):
            self.path.unlink(missing_ok=True)

    def _mine(self, owner: Optional[dict]) -> bool:
        return bool(owner) and owner.get("pid") == self._me["pid"] and owner.get("host") == self._me["host"]

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def hold(workdir: str):
    """The workdir lock for this run: taken by process 0 of a multi-host run, whose outcome every host learns
    (all raise together if the workdir is busy). Returns a context manager."""
    if jax.process_count() == 1:
        return WorkdirLock(workdir)

    @contextlib.contextmanager
    def shared():
        lock, error = None, None
        if jax.process_index() == 0:
            try:
                lock = WorkdirLock(workdir).acquire()
            except WorkdirBusy as e:
                error = e
        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok:
            raise error or WorkdirBusy(f"{workdir} is in use by another run (process 0 says who).")
        try:
            yield lock
        finally:
            if lock is not None:
                lock.release()

    return shared()
