"""The demo's probes (patch probe + image linear probe on held-out scenes) through `python -m lalign.probe`, for
one frozen backbone: reproduces a pipeline run's `probe/results.json` from its saved checkpoints alone.

    RUN=runs/demo
    python -m lalign.probe --config=configs/probe/scenes.py:$RUN --config.backbone=$RUN/teacher/params --workdir=/tmp/t
    python -m lalign.probe --config=configs/probe/scenes.py:$RUN --config.backbone=$RUN --workdir=/tmp/a  # aligned

The argument is a pipeline workdir (its config.json gives the scenes, the probe settings and the seed), or
'full' / 'smoke' for the demo's defaults (configs/demo.py). A workdir as the backbone means its aligned student
(best checkpoint); WORKDIR/teacher/params is its teacher.
"""
import importlib.util
import json
import os

from lalign import config


def _demo(arg):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "demo.py")
    spec = importlib.util.spec_from_file_location("lalign_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg).to_dict()


def get_config(arg: str = "full"):
    arg = arg or "full"
    if arg in ("full", "smoke"):
        run = _demo(arg)
    else:
        path = os.path.join(arg, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"configs/probe/scenes.py takes 'full', 'smoke' or a pipeline workdir; {path} does not "
                             f"exist.")
        with open(path) as f:
            run = json.load(f)
        if run.get("data", {}).get("name") != "scenes":
            raise ValueError(f"{path}: the run's data is {run.get('data', {}).get('name')!r}, not 'scenes'.")
    c = config.probe_defaults()
    c.data = dict(run["data"], seed=run.get("seed", 0))
    c.data.digit_size = tuple(c.data.digit_size)
    c.features.batch_size = 256  # as the pipeline extracts them
    c.probe.update(run["probe"], seeds=tuple(run["probe"]["seeds"]))
    if "select_by" not in run["probe"]:  # a run saved before the field chose its epochs by validation recall
        c.probe.select_by = "recall"
    c.image_probe = True
    return c
