"""Pod rehearsal: a config run as N JAX processes x K CPU devices on this machine, exactly as a slice runs it.

    bash scripts/pod_rehearsal.sh --processes 4 --devices 2 --steps 30 --sigterm-at 12
    python -m lalign.rehearse --processes 2 --devices 4 --steps 6 --data DIR --workdir DIR [-- --config.x=...]

Each process is `python -m lalign.main --distributed` with a localhost coordinator: a real multi-host job (JAX's
coordination service, gloo collectives between the processes' CPU devices, orbax's multi-host checkpointing,
JAX's preemption sync), only with every host on one machine. It is how a config is checked before paying for a
slice: every host builds its own rows of each batch from its own files, all hosts save and restore together, and
a SIGTERM (a preemption) reaching the hosts at different moments is saved at one step by all of them.

What it does: writes a folder of JPEG files unless `--data` names one; starts the processes on a shared workdir
(`--config`, default the So400m family's `:smoke_folder`: scan, remat, MAP head, a patch grid that does not cover
the image, fsdp across processes); with `--sigterm-at S`, sends SIGTERM to each host at a slightly different
moment once step S is logged, checks that all exit 143 having saved the same step, and starts them all again;
then prints what each host did (`workdir/hosts/process_<i>.json`) and, last, a one-line summary. Exit status 0
only when every host finished (and the preemption was saved by all at one step and resumed).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from lalign import cli, config as config_lib
from lalign.metric_writer import read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/siglip_so400m.py:smoke_folder"


def write_jpeg_folder(root: str, num_images: int = 256, num_classes: int = 8, seed: int = 0) -> str:
    """`root/class_<c>/<i>.jpg`: real JPEG files of varied sizes and aspect ratios (smooth colour fields with a
    few rectangles, so crops differ), written once; an existing folder with enough files is kept."""
    existing = [f for _, _, fs in os.walk(root) for f in fs if f.endswith(".jpg")] if os.path.isdir(root) else []
    if len(existing) >= num_images:
        return root
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        w, h = (int(v) for v in rng.integers(32, 96, 2))
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        a, b, c = rng.uniform(-1, 1, (3, 3))
        img = np.stack([128 + 100 * np.sin(3 * (a[k] * x + b[k] * y) + c[k]) for k in range(3)], -1)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            img[y0:y0 + int(rng.integers(4, 24)), x0:x0 + int(rng.integers(4, 24))] = rng.integers(0, 256, 3)
        folder = os.path.join(root, f"class_{i % num_classes}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.jpg"),
                                                                    quality=90)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_env(devices: int) -> dict:
    """The environment of one rehearsal host: K CPU devices, CPU only (the collectives then go through gloo)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_hosts(config: str, workdir: str, processes: int, devices: int, overrides=(), port: int | None = None,
                heartbeat_timeout: int = 20, log_suffix: str = "", only: int | None = None,
                distributed_timeout: int = 120, env: dict[int, dict] | None = None) -> list[subprocess.Popen]:
    """Starts every host of the job (or host `only`, with `port` shared by the caller); host i's output goes to
    `workdir/logs/host_<i><log_suffix>.log`; `env[i]`: more environment variables for host i."""
    port = port or free_port()
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    procs = []
    for i in range(processes) if only is None else [only]:
        cmd = [sys.executable, "-m", "lalign.main", f"--config={config}", f"--workdir={workdir}", "--distributed",
               f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}",
               f"--heartbeat_timeout={heartbeat_timeout}", f"--distributed_timeout={distributed_timeout}", *overrides]
        log = open(os.path.join(logs, f"host_{i}{log_suffix}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**host_env(devices), **(env or {}).get(i, {})}, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()
    return procs


def logged_steps(workdir: str, stage: str = "maskembed") -> list[dict]:
    return [r for r in read_records(workdir) if r.get("stage") == stage and "loss" in r]


def wait_hosts(procs, timeout: float, grace: float = 60.0) -> list[int]:
    """Exit codes of every host. Once one host fails, the others get `grace` seconds (JAX's heartbeat stops them
    first) before they are killed, so a rehearsal never hangs."""
    deadline, failed_at = time.time() + timeout, None
    while time.time() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if failed_at is None and any(c not in (None, 0, 143) for c in codes):
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > grace:
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    return [p.wait() for p in procs]


def sigterm_when(procs, workdir: str, step: int, timeout: float, spread_s: float = 0.3) -> bool:
    """SIGTERM to every host once `step` is logged, host i `i * spread_s` seconds after host 0 (a preemption
    reaches a slice's hosts at different moments). False if the run ended or timed out first."""
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if any(r["step"] >= step for r in logged_steps(workdir)):
            for i, p in enumerate(procs):
                if i:
                    time.sleep(spread_s)
                p.send_signal(signal.SIGTERM)
            return True
        time.sleep(0.05)
    return False


def host_reports(workdir: str, processes: int) -> list[dict]:
    out = []
    for i in range(processes):
        path = os.path.join(workdir, "hosts", f"process_{i}.json")
        out.append(json.load(open(path)) if os.path.exists(path) else {"process": i, "outcome": "no report"})
    return out


def _tail(workdir: str, i: int, suffix: str = "", lines: int = 8) -> str:
    path = os.path.join(workdir, "logs", f"host_{i}{suffix}.log")
    if not os.path.exists(path):
        return ""
    text = open(path, errors="replace").read().splitlines()
    return "\n".join("    " + line[:300] for line in text[-lines:])


def _images_per_s(rows: list[dict]) -> float:
    rates = [r["images_per_s"] for r in rows[1:] if "images_per_s" in r]  # the first interval holds compilation
    return float(np.median(rates)) if rates else float("nan")


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser (for errors found later) and the options, with the plain range checks done."""
    parser = argparse.ArgumentParser(prog="scripts/pod_rehearsal.sh", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=4, help="JAX processes (hosts)")
    parser.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    parser.add_argument("--steps", type=int, default=30, help="MaskEmbed steps")
    parser.add_argument("--sigterm-at", type=int, default=None, help="SIGTERM every host once this step is logged")
    parser.add_argument("--data", default="", help="an image folder (default: a few hundred JPEGs are written)")
    parser.add_argument("--workdir", default="", help="the shared workdir (default: a new temporary folder)")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--fsdp", type=int, default=0,
                        help="mesh fsdp size (default: 2 x devices, so fsdp spans processes, when it divides)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for each start of the job")
    parser.add_argument("overrides", nargs="*", help="after --: more --config.x=... flags for every host")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.devices < 1 or args.steps < 1:
        parser.error("--processes, --devices and --steps must be positive")
    if args.sigterm_at is not None and not 0 < args.sigterm_at < args.steps:
        parser.error(f"--sigterm-at must be between 1 and {args.steps - 1}")
    return parser, args


def job_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, workdir: str,
                  fsdp: int) -> tuple[list[str], str]:
    """(the --config.* flags every host gets, what data the job reads): the steps and mesh, the image folder
    (given, or written into the workdir) when the config reads one, then the user's own overrides."""
    overrides = [f"--config.total_steps={args.steps}", "--config.mesh.data=-1", f"--config.mesh.fsdp={fsdp}"]
    data = "the config's own"
    if config_lib.load(args.config).data.get("name") == "image_folder":  # real files: given, or written here
        data = os.path.abspath(args.data) if args.data else write_jpeg_folder(os.path.join(workdir, "images"))
        overrides.append(f"--config.data.path={data}")
    elif args.data:
        parser.error(f"--data: {args.config} does not read an image folder")
    return overrides + args.overrides, data


def preempt_and_restart(args: argparse.Namespace, workdir: str, procs: list[subprocess.Popen],
                        overrides: list[str]) -> tuple[list[str], int | None, list[subprocess.Popen]]:
    """SIGTERM every host once step `args.sigterm_at` is logged, check that all exit 143 having saved one step,
    and start them all again: (problems, the step they saved or None, the restarted hosts; the stopped ones
    when there are problems)."""
    problems = []
    if not sigterm_when(procs, workdir, args.sigterm_at, args.timeout):
        problems.append(f"the run ended before step {args.sigterm_at} was logged")
    codes = wait_hosts(procs, args.timeout)
    reports = host_reports(workdir, args.processes)
    saved = {r.get("step") for r in reports}
    print(f"[rehearsal] SIGTERM at step {args.sigterm_at}: exit codes {codes}, saved steps "
          f"{[r.get('step') for r in reports]}", flush=True)
    if any(c != 143 for c in codes):
        problems.append(f"after SIGTERM the hosts exited {codes}, not 143 each")
    if len(saved) != 1 or any(r.get("outcome") != "preempted" for r in reports):
        outcomes = [(r.get("outcome"), r.get("step")) for r in reports]
        problems.append(f"the hosts did not all save one step: {outcomes}")
    resumed_from = sorted(saved)[0] if len(saved) == 1 else None
    if not problems:
        procs = start_hosts(args.config, workdir, args.processes, args.devices, overrides, log_suffix="_restart")
    return problems, resumed_from, procs


def check_hosts(workdir: str, processes: int, steps: int, resumed_from: int | None, log_suffix: str) -> list[str]:
    """Prints what each host did (its report, and its log's tail when it did not finish); the problems: hosts
    that did not finish all `steps`, or (after a preemption) did not all resume from `resumed_from`."""
    problems = []
    reports = host_reports(workdir, processes)
    for r in reports:
        rows = r.get("batch_rows")
        print(f"[rehearsal] host {r['process']}: {r.get('outcome')} at step {r.get('step')}, "
              f"{r.get('local_devices')} devices, batch rows {rows}, resumed from {r.get('resumed_from')}, "
              f"{r.get('train_files_read')} training files read, {r.get('seconds')} s", flush=True)
        if r.get("outcome") != "finished" or r.get("step") != steps:
            problems.append(f"host {r['process']} did not finish: {r.get('outcome')} at step {r.get('step')}")
            print(_tail(workdir, r["process"], log_suffix), flush=True)
    if resumed_from is not None and any(r.get("resumed_from") != resumed_from for r in reports):
        problems.append(f"the restart did not resume every host from step {resumed_from}: "
                        f"{[r.get('resumed_from') for r in reports]}")
    return problems


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    n, k = args.processes, args.devices
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="lalign-rehearsal-"))
    fsdp = args.fsdp or (2 * k if n > 1 and n % 2 == 0 else k)
    overrides, data = job_overrides(parser, args, workdir, fsdp)
    print(f"[rehearsal] {n} processes x {k} devices, mesh fsdp={fsdp}, {args.steps} steps, config {args.config}, "
          f"data {data}, workdir {workdir}", flush=True)

    t0 = time.time()
    problems, resumed_from = [], None
    procs = start_hosts(args.config, workdir, n, k, overrides, log_suffix="")
    if args.sigterm_at is not None:
        problems, resumed_from, procs = preempt_and_restart(args, workdir, procs, overrides)
    if not problems:
        codes = wait_hosts(procs, args.timeout)
        if any(codes):
            problems.append(f"hosts exited {codes}")
    problems += check_hosts(workdir, n, args.steps, resumed_from, "_restart" if args.sigterm_at is not None else "")

    rate = _images_per_s(logged_steps(workdir))
    status = "OK" if not problems else "FAILED: " + "; ".join(problems)
    print(f"pod rehearsal {status} | {n} hosts x {k} devices | {args.steps} steps | {rate:.0f} images/s | "
          f"resumed from step {resumed_from if resumed_from is not None else '-'} | "
          f"{time.time() - t0:.0f} s | {workdir}", flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(cli.returning("rehearse", main))
