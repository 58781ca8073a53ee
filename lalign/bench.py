"""Benchmark of the real MaskEmbed training step: `python -m lalign.bench --config=configs/demo.py`.

Compiles the step that `train.py` runs (same sharding, same donation), warms up, times `--steps` steps with
`block_until_ready`, and prints one JSON line: images_per_s, step_s (median, min), flops_per_step (analytic model
below, with XLA's `cost_analysis()` beside it), achieved TFLOP/s, the device's peak TFLOP/s and MFU, and peak
memory where the backend reports it. On CPU the peak is *measured* in the same run (a large jitted matmul).
`--profile=DIR` traces one more step into DIR and adds `time_breakdown`: the shares of op time by part of the
step (teacher, student forward/backward, decoder forward/backward, optimizer) and by kind of work (attention
matmuls, other matmuls, elementwise), and the slowest ops. `--data` also times the configured training source
alone (`data_throughput`: this process's rows of each global batch, decoded by its threads or `data.num_workers`
worker processes) and adds `bound_by`: "data" where the host builds batches more slowly than the step consumes
them, else "step".

FLOP model: lalign/cost_model.py.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags, logging
from jax.profiler import ProfileData
from ml_collections import config_flags

from lalign import allocator, cli, sharding
from lalign import data as data_lib
from lalign.cost_model import PEAK_TFLOPS, maskembed_flops_per_image
from lalign.models.vit import vit_from_config
from lalign.train import build_step

def measured_cpu_peak_tflops(n: int = 2048, repeats: int = 5) -> float:
    """Float32 matmul throughput of this host, measured: the CPU's practical peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def device_peak_tflops() -> tuple[float, str]:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return measured_cpu_peak_tflops(), "measured (jitted 2048^2 float32 matmul)"
    for name, peak in PEAK_TFLOPS.items():
        if dev.device_kind.startswith(name):
            return peak * len(jax.devices()), f"data sheet ({dev.device_kind}, bf16, x{len(jax.devices())})"
    return float("nan"), f"unknown device kind {dev.device_kind!r}"


def xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


# ------------------------------------------------------------------------------------ where the step's time goes
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\(.*?\)|\S+) (\w[\w-]*)\((.*)$")  # shape: tuple or not
_ATTENTION_EINSUM = re.compile(r"hq[dk],\.\.\.hkd->\.\.\.hq[kd]")  # the two einsums of models.vit.attention
_CONTAINERS = ("while", "call", "conditional", "async-start", "async-done")  # their events contain their bodies'


def hlo_op_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (part of the step, kind of work), from the compiled module's text.

    part: the module its `op_name` metadata names (the teacher is a `ViT` applied outside `MaskEmbedModel`;
    student and decoder are its submodules; backward ops carry `transpose(`), else "optimizer and rest".
    kind: "attention matmul" (the logits and weights x values einsums), "matmul" (any other dot or
    convolution, including a fusion around one), else "elementwise and other".
    """
    comps, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = comps.setdefault(header.group(1), [])
        elif current is not None and line.strip() != "}":
            current.append(line)
    has_dot = {name: any(re.search(r" (dot|convolution)\(", ln) for ln in body) for name, body in comps.items()}
    kinds = {}
    for body in comps.values():
        for line in body:
            m = _INSTRUCTION.match(line)
            if not m or m.group(2) in _CONTAINERS:
                continue
            name, opcode, rest = m.groups()
            meta = re.search(r'op_name="([^"]*)"', rest)
            op_name = meta.group(1) if meta else ""
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            is_dot = opcode in ("dot", "convolution") or bool(called and has_dot.get(called.group(1)))
            part = ("teacher" if "(ViT)" in op_name else "student" if "/student" in op_name
                    else "decoder" if "/decoder" in op_name else "optimizer and rest")
            if part in ("student", "decoder"):
                part += " backward" if "transpose(" in op_name else " forward"
            kind = ("attention matmul" if is_dot and _ATTENTION_EINSUM.search(op_name)
                    else "matmul" if is_dot else "elementwise and other")
            kinds[name] = (part, kind)
    return kinds


def time_breakdown(step_fn, args, hlo_text: str, trace_dir: str) -> dict:
    """Traces one call of `step_fn(*args)` with the JAX profiler into `trace_dir` (TensorBoard's profile plugin
    or Perfetto read it) and splits the time of the HLO ops it ran by part of the step and kind of work, as
    shares of the total op time (summed over threads). Events that are not ops of this module (runtime
    bookkeeping) are left out. Tracing adds a fixed cost per op, so for a step of many tiny ops (the demo
    model) the shares lean towards the parts with the most ops; against ViT-B/16's large ops it is small."""
    traces = lambda: set(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))  # noqa: E731
    earlier = traces()  # a reused directory keeps earlier runs' traces: read only this one's
    jax.profiler.start_trace(trace_dir)
    jax.block_until_ready(step_fn(*args))
    jax.profiler.stop_trace()
    kinds = hlo_op_kinds(hlo_text)
    by_part, by_kind, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for path in traces() - earlier:
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in kinds:
                        part, kind = kinds[event.name]
                        by_part[part] += event.duration_ns
                        by_kind[kind] += event.duration_ns
                        by_op[event.name] += event.duration_ns
    total = sum(by_part.values())
    if not total:
        return {"trace_dir": trace_dir, "note": "the trace holds no events named after this module's ops"}
    share = lambda c: {k: round(v / total, 4) for k, v in c.most_common()}  # noqa: E731
    return {"trace_dir": trace_dir, "op_time_s": total / 1e9, "by_part": share(by_part), "by_kind": share(by_kind),
            "slowest_ops": [[name, *kinds[name], round(ns / 1e6, 2)] for name, ns in by_op.most_common(5)]}


def run(config, steps: int = 10, warmup: int = 2, profile_dir: str = "") -> dict:
    """Compiles and times the MaskEmbed step for `config` (random weights and images of the right shape)."""

    size = config.data.image_size
    teacher = vit_from_config(config, num_classes=None)
    images = jax.random.normal(jax.random.key(1), (config.batch_size, size, size, 3), jnp.float32)
    teacher_params = jax.jit(teacher.init)(jax.random.key(0), images[:1])["params"]
    s = build_step(config, teacher, teacher_params, images[:2])
    state = s.init(teacher_params, s.keys["init"])
    if config.data.get("name") != "scenes":  # real images reach the step as uint8, normalized inside it
        images = jax.random.randint(jax.random.key(1), images.shape, 0, 256, jnp.int32).astype(jnp.uint8)

    images = jax.device_put(images, sharding.batch_sharding(s.mesh))
    t0 = time.perf_counter()
    compiled = s.train_step.lower(state, s.teacher_params, images).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = s.train_step(state, s.teacher_params, images)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = s.train_step(state, s.teacher_params, images)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    model_flops = maskembed_flops_per_image(teacher, size, config.maskembed, config.maskembed.decoder_depth)
    flops_per_step = model_flops["total"] * config.batch_size
    step_s = statistics.median(times)
    achieved = flops_per_step / step_s / 1e12
    peak, peak_source = device_peak_tflops()
    mem = jax.devices()[0].memory_stats() or {}
    breakdown = {}
    if profile_dir:
        breakdown = {"time_breakdown": time_breakdown(s.train_step, (state, s.teacher_params, images),
                                                      compiled.as_text(), profile_dir)}
    return {
        "device": jax.devices()[0].device_kind, "num_devices": len(jax.devices()), "batch_size": config.batch_size,
        "image_size": size, "images_per_s": config.batch_size / step_s, "step_s": step_s, "step_s_min": min(times),
        "compile_s": compile_s, "flops_per_step": flops_per_step, "xla_flops_per_step": xla_flops(compiled),
        # XLA's cost analysis counts a while-loop body once, so with nn.scan it undercounts by about the depth.
        "xla_flops_note": "scanned blocks: XLA counts one block" if teacher.scan else "",
        "flops_per_image_parts": {k: v for k, v in model_flops.items()}, "achieved_tflops": achieved,
        "peak_tflops": peak, "peak_source": peak_source, "mfu": achieved / peak if peak == peak else None,
        "peak_memory_bytes": mem.get("peak_bytes_in_use"), "loss": float(metrics["loss"]),
        "allocator": allocator.describe(), **breakdown,
    }


def data_throughput(config, steps: int = 10, warmup: int = 1) -> dict:
    """Times the training source of `config.data` alone, as the training loop asks it: this process's rows of
    global batches `warmup`.. of `config.batch_size`. Returns data_images_per_s (this process), data_threads (its
    parallel decoders: grain's worker processes, `data.num_workers`, or with none the threads of this process),
    data_processes (those worker processes, 0 for threads), data_cores (the decoders, at most the CPUs this process
    may use), data_images_per_s_per_core, and data_cpu_ms_per_image (CPU time per image of this process and its
    worker processes, over the timed steps)."""
    shard = (jax.process_index(), jax.process_count())
    local = config.batch_size // shard[1]
    source = data_lib.image_source(config.data, "maskembed", seed=config.seed)
    try:
        for step in range(warmup):  # file system caches, thread and worker start-up
            source.batch(step, config.batch_size, shard)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        for step in range(warmup, warmup + steps):
            source.batch(step, config.batch_size, shard)
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    finally:
        if hasattr(source, "close"):
            source.close()
    threads = int(getattr(source, "num_workers", 1))  # the scenes render in the calling thread
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(threads, cpus)
    per_process = local * steps / wall
    return {"data_source": config.data.get("name"), "data_images_per_s": per_process, "data_threads": threads,
            "data_processes": int(getattr(source, "processes", 0)), "data_cores": cores,
            "data_images_per_s_per_core": per_process / cores, "data_cpu_ms_per_image": 1e3 * cpu / (local * steps)}


def _cpu_seconds() -> float:
    """CPU time of this process and of its live child processes (grain's decoding workers): psutil reads theirs
    while they run (the resource module counts a child only once it has exited)."""
    total = time.process_time()
    try:
        import psutil  # grain's dependency (through portpicker)

        for child in psutil.Process().children(recursive=True):
            try:
                t = child.cpu_times()
                total += t.user + t.system
            except psutil.Error:  # exited meanwhile
                pass
    except ImportError:
        pass
    return total


def run_with_data(config, steps: int = 10, warmup: int = 2, profile_dir: str = "") -> dict:
    """`run` and `data_throughput` on the same config, and which of the two bounds training (per process: the
    step consumes this process's rows of `step_images_per_s`)."""
    data = data_throughput(config, steps, min(warmup, 1))
    out = run(config, steps, warmup, profile_dir)
    step_rate = out["images_per_s"] / jax.process_count()
    return {**out, **data, "step_images_per_s_per_process": step_rate,
            "bound_by": "data" if data["data_images_per_s"] < step_rate else "step"}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    print(json.dumps((run_with_data if f.data else run)(f.config, f.steps, f.warmup, f.profile)))


def console() -> None:
    """`lalign-bench` / `python -m lalign.bench`. Flags are defined here, not at import: importing the module
    (the tests, lalign.memory) defines none."""
    config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
    flags.DEFINE_integer("steps", 10, "Timed steps.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.DEFINE_string("profile", "", "Trace one more step into this directory and add `time_breakdown` (share "
                        "of op time by teacher/student/decoder/optimizer and by attention matmul/matmul/other).")
    flags.DEFINE_bool("data", False, "Also time the configured training source alone (images/s per process and per "
                      "core) and say which of data and step bounds training (`bound_by`).")
    flags.mark_flags_as_required(["config"])
    allocator.use_tcmalloc()  # CPU step times depend on it: lalign/allocator.py
    cli.run_absl("bench", main)


if __name__ == "__main__":
    console()
