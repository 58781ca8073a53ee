"""Multi-host runs: joining the job, checking that every host runs the same experiment, stopping together.

Every host of a slice runs the same `python -m lalign.main ... --distributed`. Where the job's coordinator and
this host's place in it come from, first found wins:
  1. flags `--coordinator_address`, `--num_processes`, `--process_id`;
  2. environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
  3. JAX's cluster auto-detection (Cloud TPU VMs, SLURM, Open MPI, ...), when none of the above is set.
So the same command runs on a TPU slice (nothing to give), on GPU hosts and on localhost (`lalign.rehearse`).

Preemption on a slice: the SIGTERM reaches the hosts at different moments, so a host that saved "where it is"
would enter a checkpoint of another step than its peers (a hang, or a checkpoint of two steps). JAX's preemption
sync (`reached_preemption_sync_point`) makes all hosts agree, through the coordination service and without any
device work, on one step at which every host stops; `Preemption` wraps it, and falls back to a plain SIGTERM flag
in a single-process run.

A host lost mid-run (SIGKILL, a lost VM) makes JAX's coordination service abort every other host with a native
crash report once the heartbeat timeout passes. The collective the survivors are in fails first (gloo: the
connection resets); `stop_if_host_lost` then asks `Liveness` which host went quiet, prints one line naming it
and the step a restart resumes from, and ends the process before that abort. A survivor that is not in a
collective (saving, evaluating, loading data) learns it from `Liveness`'s own watchdog, a third of the heartbeat
timeout after the host's last sign of life, and prints the same line.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

try:  # JAX's coordination client and preemption sync manager (no public name)
    from jax._src import distributed as jax_distributed
except ImportError:  # pragma: no cover - a JAX without it
    jax_distributed = None

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def resolve(coordinator_address: str = "", num_processes: Optional[int] = None,
            process_id: Optional[int] = None, environ=os.environ) -> dict:
    """The arguments for `jax.distributed.initialize` from flags, then the environment; absent ones are left to
    JAX's cluster auto-detection. A half-given localhost job (an address without a count) is a clear error."""
    given = {"coordinator_address": coordinator_address or None, "num_processes": num_processes,
             "process_id": process_id}
    for name, var in ENV.items():
        if given[name] is None and environ.get(var, "") != "":
            value = environ[var]
            if name != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"{var}={value!r} is not an integer.") from None
            given[name] = value
    out = {k: v for k, v in given.items() if v is not None}
    if out and set(out) != set(ENV):
        missing = [f"--{k} (or {ENV[k]})" for k in ENV if k not in out]
        raise ValueError(f"--distributed: got {sorted(out)} but not {', '.join(missing)}; give all three, or none "
                         f"to let JAX detect the cluster (Cloud TPU, SLURM, ...).")
    if "num_processes" in out:
        if out["num_processes"] < 1:
            raise ValueError(f"--num_processes must be at least 1, got {out['num_processes']}.")
        if not 0 <= out["process_id"] < out["num_processes"]:
            raise ValueError(f"--process_id {out['process_id']} is outside 0..{out['num_processes'] - 1}.")
    return out


class JoinError(RuntimeError):
    """This host could not join the multi-host job (coordinator unreachable, hosts missing)."""


def initialize(coordinator_address: str = "", num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, initialization_timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> None:
    """Joins the multi-host job. A coordinator that cannot be reached fails after `initialization_timeout_s`; a
    host that dies (SIGKILL, lost VM) makes the others stop after `heartbeat_timeout_s`, with JAX naming it."""
    kwargs = resolve(coordinator_address, num_processes, process_id)
    if kwargs.get("process_id", 0) != 0:
        # JAX aborts the whole process (no Python error) when the coordinator never answers: look first.
        wait_for_coordinator(kwargs["coordinator_address"], initialization_timeout_s, kwargs)
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        # CPU devices of different processes talk through gloo (a localhost rehearsal); accelerators have their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=int(initialization_timeout_s),
                                   heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    except Exception as e:  # noqa: BLE001 - whatever JAX raises, the user needs where and why in one line
        where = kwargs.get("coordinator_address", "the auto-detected coordinator")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JoinError(f"--distributed: could not join the job at {where} as process "
                           f"{kwargs.get('process_id', '?')} of {kwargs.get('num_processes', '?')} within "
                           f"{initialization_timeout_s}s: {first}") from e
    if jax.process_count() > 1:
        global _liveness
        _liveness = Liveness(jax_distributed.global_state.client, jax.process_index(), jax.process_count(),
                             heartbeat_timeout_s, on_lost=_watchdog_found_lost)


def wait_for_coordinator(address: str, timeout_s: float, kwargs: dict) -> None:
    """Returns once process 0's coordinator accepts connections at `address` (host:port); raises JoinError
    naming it after `timeout_s`."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address {address!r} is not host:port.")
    deadline, last = time.time() + timeout_s, None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            last = e
        if time.time() > deadline:
            raise JoinError(f"--distributed: could not join the job at {address} as process "
                            f"{kwargs['process_id']} of {kwargs['num_processes']} within {timeout_s}s: nothing "
                            f"answers there ({last}). Is process 0 running, with this address?")
        time.sleep(0.5)


def config_fingerprint(config) -> str:
    """A short hash of the whole config (what decides the run), to compare across hosts."""
    text = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_config(config) -> None:
    """Every host must run the same experiment: hosts started with different configs (a stale checkout, another
    override) would train different models in one collective step. Compared at start, before anything is
    written; all hosts raise the same error."""
    if jax.process_count() == 1:
        return
    mine = config_fingerprint(config)
    digits = np.frombuffer(bytes.fromhex(mine), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digits)).reshape(jax.process_count(), -1)
    hashes = [bytes(row.astype(np.uint8)).hex() for row in every]
    if len(set(hashes)) > 1:
        groups: dict[str, list[int]] = {}
        for i, h in enumerate(hashes):
            groups.setdefault(h, []).append(i)
        desc = "; ".join(f"processes {ids} have config {h}" for h, ids in groups.items())
        raise ValueError(f"The hosts were started with different configs ({desc}). Run the same command, with "
                         f"the same checkout and overrides, on every host.")


def sync_manager_ready() -> bool:
    """Whether JAX's preemption sync runs: a multi-host job joined with `jax.distributed.initialize`."""
    if jax_distributed is None:  # pragma: no cover - a JAX without it
        return False
    return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None


# Tests only: "STEP:SIGNAL" (e.g. "12:SIGTERM") makes this process send itself SIGNAL at the boundary of step STEP,
# so that a test preempts or kills a run at a known step however loaded the machine is.
TEST_SIGNAL_ENV = "LALIGN_TEST_SIGNAL_AT_STEP"


def _test_signal_at_step() -> Optional[tuple[int, int]]:
    value = os.environ.get(TEST_SIGNAL_ENV, "")
    if not value:
        return None
    step, _, name = value.partition(":")
    try:
        return int(step), int(getattr(signal, name or "SIGTERM"))
    except (ValueError, AttributeError):
        raise ValueError(f"{TEST_SIGNAL_ENV}={value!r}: expected STEP:SIGNAL, e.g. 12:SIGTERM") from None


class Preemption:
    """`stop(step)`: whether the run should save step `step` and exit, asked at every step boundary.

    Multi-host: JAX's preemption sync (its notifier catches SIGTERM on any host; every host answers True at the
    same step). Single process: SIGTERM sets a flag (a step is never cut in half). Use as a context manager."""

    def __enter__(self):
        self.requested, self._previous = False, None
        self._test_signal = _test_signal_at_step()
        self._synced = sync_manager_ready()
        if not self._synced and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def stop(self, step: int) -> bool:
        if self._test_signal and self._test_signal[0] == step:
            os.kill(os.getpid(), self._test_signal[1])
        if self._synced:
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(int(step))
        return self.requested


# ----------------------------------------------------------------------------------------- a host lost mid-run
LOST_HOST_EXIT = 75  # EX_TEMPFAIL: nothing is wrong with the run itself; restarting every host resumes it
_liveness: Optional["Liveness"] = None
_resume_point: Optional[Callable[[], str]] = None  # where a restart resumes; set by StopIfHostLost
_announce_lock = threading.Lock()


class Liveness:
    """Every host bumps its own counter in the coordination service's key-value store a few times a second (a
    daemon thread) and reads everyone's counters once a second, all in one call. A host whose counter stands
    still for `quiet_s` (a third of JAX's heartbeat timeout, so well before JAX aborts every process with a
    native crash report) is lost: `on_lost` gets its index. A host that ends (normally or not) writes `DONE`
    first, so hosts that finish at different moments are never taken for lost ones."""

    PREFIX = "lalign/alive/"
    DONE = "done"

    def __init__(self, client, process_id: int, num_processes: int, heartbeat_timeout_s: float,
                 on_lost: Optional[Callable[[list[int], float], None]] = None, period_s: float = 0.2,
                 check_s: float = 1.0):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.heartbeat_timeout_s, self.period_s, self.check_s = float(heartbeat_timeout_s), period_s, check_s
        self.quiet_s = max(self.heartbeat_timeout_s / 3, 3 * check_s)
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lalign-liveness", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # runs before JAX's own exit hook shuts the client down

    def _beat(self) -> None:
        count, seen, unreadable_since, next_check = 0, {}, None, time.monotonic() + self.check_s
        while not self._stop.is_set():
            count += 1
            try:
                self.client.key_value_set(f"{self.PREFIX}{self.process_id}", str(count), allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the coordinator is gone or shutting down: nothing left to tell
                unreadable_since = unreadable_since or time.monotonic()
            now = time.monotonic()
            if self.on_lost is not None and now >= next_check:
                next_check = now + self.check_s
                try:
                    counts = self._counts()
                    unreadable_since = None
                except Exception:  # noqa: BLE001 - the coordinator (process 0) does not answer
                    counts, unreadable_since = {}, unreadable_since or now
                for i, value in counts.items():
                    if value == self.DONE:
                        seen[i] = (value, float("inf"))  # ended: never lost
                    elif i not in seen or seen[i][0] != value:
                        seen[i] = (value, now)
                lost = sorted(i for i, (_, since) in seen.items() if now - since > self.quiet_s)
                if not lost and unreadable_since is not None and now - unreadable_since > self.quiet_s \
                        and self.process_id != 0:
                    lost = [0]
                if lost and not self._stop.is_set():
                    since = [seen[i][1] for i in lost if i in seen] or [unreadable_since]
                    self.on_lost(lost, now - min(since))
            self._stop.wait(self.period_s)

    def close(self) -> None:
        """Stops beating and tells the others this host ended (not lost)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.client.key_value_set(f"{self.PREFIX}{self.process_id}", self.DONE, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator is already gone
            pass

    def _counts(self) -> dict[int, Optional[str]]:
        """Every other host's counter (None before its first beat), read in one call."""
        out = {i: None for i in range(self.num_processes) if i != self.process_id}
        for key, value in self.client.key_value_dir_get(self.PREFIX):
            i = int(key.rstrip("/").rsplit("/", 1)[-1])
            if i in out:
                out[i] = value
        return out

    def quiet(self, window_s: float) -> list[int]:
        """The other hosts whose counter did not move during `window_s` seconds (ended hosts excepted). Raises
        when the coordinator (process 0) itself cannot be reached."""
        first = self._counts()
        time.sleep(window_s)
        last = self._counts()
        return [i for i in first if first[i] == last[i] and last[i] != self.DONE]


def _lost_hosts_text(lost: list[int], process_id: int) -> str:
    if lost == [0] and process_id != 0:
        return "host 0 (the job's coordinator) stopped answering"
    if len(lost) == 1:
        return f"host {lost[0]} stopped sending heartbeats"
    return f"hosts {', '.join(map(str, lost))} stopped sending heartbeats"


def _announce_lost_and_exit(who: str, saw: str, resume: Optional[Callable[[], str]]) -> None:
    """One line (which host, that the run stops, `resume()`: where a restart resumes) and exit LOST_HOST_EXIT at
    once. The first caller wins: the training loop's failed collective and the watchdog can both get here."""
    if not _announce_lock.acquire(blocking=False):
        time.sleep(3600)  # the other caller is printing and exiting; never return into a broken job
    try:
        where = resume() if resume is not None else "the latest checkpoint"
    except Exception:  # noqa: BLE001
        where = "the latest checkpoint"
    print(f"[distributed] {who}; the run stops; restart all hosts to resume from {where} "
          f"(this host {_liveness.process_id if _liveness else '?'} saw: {saw})", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(LOST_HOST_EXIT)


def _watchdog_found_lost(lost: list[int], quiet_for: float) -> None:
    _announce_lost_and_exit(_lost_hosts_text(lost, _liveness.process_id),
                            f"no sign of life for {quiet_for:.0f} s", _resume_point)


def stop_if_host_lost(error: BaseException, resume: Callable[[], str]) -> None:
    """Called with an exception of a multi-host run. When another host has gone quiet (killed, its VM lost),
    prints one line (which host, that the run stops, `resume()`: where a restart resumes) and ends this process
    with LOST_HOST_EXIT at once, before JAX's coordination service aborts it with a native crash report.
    Otherwise returns, and the caller re-raises `error`."""
    if _liveness is None:
        return
    # JAX aborts about a heartbeat timeout after the last heartbeat it got: decide well within that.
    window = min(2.0, max(0.5, _liveness.heartbeat_timeout_s / 5))
    try:
        quiet = _liveness.quiet(window)
        who = _lost_hosts_text(quiet, _liveness.process_id) if quiet else ""
    except Exception:  # noqa: BLE001 - the coordinator's own key-value store is gone
        who = _lost_hosts_text([0], _liveness.process_id) if _liveness.process_id != 0 else ""
    if not who:
        return
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    _announce_lost_and_exit(who, first, resume)


class StopIfHostLost:
    """`with StopIfHostLost(resume):` around a multi-host training loop: an exception leaving it goes through
    `stop_if_host_lost` (one line and exit when a host was lost; otherwise it propagates unchanged)."""

    def __init__(self, resume: Callable[[], str]):
        self.resume = resume

    def __enter__(self):
        global _resume_point
        self._outer, _resume_point = _resume_point, self.resume  # what the watchdog's line says, too
        return self

    def __exit__(self, kind, error, tb) -> bool:
        global _resume_point
        try:
            # FloatingPointError: the run's own finite-loss check, never a lost host
            if isinstance(error, Exception) and not isinstance(error, FloatingPointError):
                stop_if_host_lost(error, self.resume)
        finally:
            _resume_point = self._outer  # only now: the watchdog may fire while stop_if_host_lost looks
        return False
