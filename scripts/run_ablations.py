"""Runs the demo ablations (configs/demo_ablations.py) over seeds, reusing one pre-trained teacher per seed.

    python scripts/run_ablations.py --teachers=/tmp/runs/demo_s{seed} --out=/tmp/ablations [--jobs=2]
        [--settings=all] [--seeds=0,1,2] [--reuse target_penultimate=/tmp/runs/pen_s{seed}] [--probe-seeds=0,1,2]

--teachers names finished default demo runs (`python -m lalign.main --config=configs/demo.py --config.seed=S`),
one per seed, or, for settings that change the teacher (scenes_64_whiten, teacher_crop_whiten), runs of the
setting that trained it (scenes_64, teacher_crop); a teacher unlike the setting's is refused before any work.
Each run OUT/NAME_sS gets a copy of that seed's `teacher/` (so every setting aligns the same teacher), and
`probe/teacher.json` from OUT/baseline_sS, else from the teacher's own run (so the teacher is probed once per
seed; a copied probe whose key does not match this run is recomputed). The baseline setting *is* the demo default,
so baseline_sS copies the demo run's MaskEmbed checkpoints and their probe (`probe/aligned.json`, reused when the
probe config matches: with `--probe-seeds=0,1,2`); `--reuse NAME=DIR` does the same for another setting already
trained elsewhere. Runs are setting-major (all seeds of one setting before the next), a finished run (summary.json)
is skipped, an interrupted one resumes, each logs to OUT/NAME_sS.log. On 2 CPU cores, 2 jobs give ~15% more
throughput than 1.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ml_collections  # noqa: E402

from lalign.configs.demo_ablations import SETTINGS, get_config  # noqa: E402
from lalign.pipeline import backbone_identities  # noqa: E402


def teacher_identity(config) -> dict:
    """What a setting's teacher is: its pre-training (config and model), data and seed."""
    ident = {"data": config.data.to_dict(), "seed": config.seed, **backbone_identities(config, 0)["teacher"]}
    return json.loads(json.dumps(ident))  # tuples -> lists, as in a saved config.json


def _overlay(defaults: dict, saved: dict) -> dict:
    out = {**defaults, **saved}
    for k, v in defaults.items():
        if isinstance(v, dict) and isinstance(saved.get(k), dict):
            out[k] = _overlay(v, saved[k])
    return out


def check_teacher(source: str, name: str, seed: int) -> None:
    """A setting that changes the teacher (its data, model or pre-training: scenes_64) cannot align another
    setting's teacher: fail before any work, naming what differs."""
    wanted = get_config(name)
    wanted.seed = seed
    with open(os.path.join(source, "config.json")) as f:
        saved = json.load(f)
    # A run saved before a config field existed ran with that field's default.
    have = teacher_identity(ml_collections.ConfigDict(_overlay(get_config("baseline").to_dict(), saved)))
    want = teacher_identity(wanted)
    if have != want:
        differs = sorted(k for k in want if want[k] != have.get(k))
        raise ValueError(f"--teachers: {source} holds a teacher unlike setting {name!r}'s (differs in {differs}); "
                         f"run that setting's own teachers first: python -m lalign.main "
                         f"--config=configs/demo_ablations.py:{name} --config.seed={seed} --workdir=…")


def prepare(out: str, name: str, seed: int, teachers: str, reuse: dict) -> str:
    workdir = os.path.join(out, f"{name}_s{seed}")
    if os.path.isdir(workdir):
        return workdir  # finished (skipped by the caller) or interrupted (resumes)
    source = teachers.format(seed=seed)
    if not os.path.isdir(os.path.join(source, "teacher")):
        raise FileNotFoundError(f"--teachers: {source}/teacher does not exist (a finished demo run of seed {seed}).")
    check_teacher(source, name, seed)
    os.makedirs(os.path.join(workdir, "probe"))
    shutil.copytree(os.path.join(source, "teacher"), os.path.join(workdir, "teacher"))
    trained = {"baseline": teachers, **reuse}.get(name)  # where this setting's checkpoints were already trained
    trained = trained.format(seed=seed) if trained else None
    if trained:
        shutil.copytree(os.path.join(trained, "checkpoints"), os.path.join(workdir, "checkpoints"))
    # Probe results already computed: the pipeline reuses one only if its key (probe config, data, seed, backbone
    # identity, checkpoint step) matches this run, and probes that backbone again otherwise.
    for teacher_probe in (os.path.join(out, f"baseline_s{seed}", "probe", "teacher.json"),
                          os.path.join(source, "probe", "teacher.json")):
        if os.path.isfile(teacher_probe):
            shutil.copy(teacher_probe, os.path.join(workdir, "probe", "teacher.json"))
            break
    if trained and os.path.isfile(os.path.join(trained, "probe", "aligned.json")):  # those checkpoints' probe
        shutil.copy(os.path.join(trained, "probe", "aligned.json"), os.path.join(workdir, "probe", "aligned.json"))
    return workdir


def run_one(out: str, name: str, seed: int, teachers: str, reuse: dict,
            probe_seeds: str = "") -> tuple[str, int, float]:
    workdir = prepare(out, name, seed, teachers, reuse)
    if os.path.isfile(os.path.join(workdir, "summary.json")):
        return workdir, 0, 0.0
    t0 = time.time()
    cmd = [sys.executable, "-m", "lalign.main", f"--config=configs/demo_ablations.py:{name}", f"--workdir={workdir}",
           f"--config.seed={seed}"] + ([f"--config.probe.seeds=({probe_seeds},)"] if probe_seeds else [])
    with open(workdir + ".log", "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return workdir, rc, time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", required=True, help="finished demo runs, with {seed}: /tmp/runs/demo_s{seed}")
    p.add_argument("--out", required=True)
    p.add_argument("--settings", default="all", help=f"comma-separated, or all: {', '.join(SETTINGS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--reuse", nargs="*", default=[], help="NAME=DIR-with-{seed}: checkpoints already trained")
    p.add_argument("--probe-seeds", default="",
                   help="e.g. 0,1,2: the demo's own probe (its 3 seeds) instead of the ablations' one probe seed; "
                        "then the baseline reuses the demo run's probe results as they are")
    args = p.parse_args(argv)
    names = list(SETTINGS) if args.settings == "all" else args.settings.split(",")
    unknown = set(names) - set(SETTINGS)
    if unknown:
        p.error(f"unknown settings {sorted(unknown)}; choose from {list(SETTINGS)}")
    reuse = dict(item.split("=", 1) for item in args.reuse)
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)

    def launch(pool, jobs):
        futures = [pool.submit(run_one, args.out, n, s, args.teachers, reuse, args.probe_seeds) for n, s in jobs]
        failed = 0
        for f in concurrent.futures.as_completed(futures):
            workdir, rc, secs = f.result()
            failed += rc != 0
            print(f"{'FAILED rc=%d' % rc if rc else 'done'}  {workdir}  [{secs / 60:.1f} min]", flush=True)
        return failed

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        # The baselines first: they hold (or probe) each seed's teacher probe, which the other settings then reuse.
        failed = launch(pool, [("baseline", s) for s in seeds]) if "baseline" in names else 0
        failed += launch(pool, [(n, s) for n in names if n != "baseline" for s in seeds])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
