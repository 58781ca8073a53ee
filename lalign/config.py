"""Experiment configs: `configs/<name>.py[:arg]` files whose `get_config(arg)` builds an ml_collections ConfigDict,
as big_vision's are. `load(spec)` reads one as `lalign.main --config=` does, for scripts and tests."""
from __future__ import annotations

import importlib.util
import os

# The checkout (or installed package) lalign runs from: a relative config path that is not found from the current
# directory is read from here, so `load("configs/demo.py")` works from any directory.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(spec: str):
    """`configs/x.py[:arg]` -> its ConfigDict (`get_config(arg)`, or `get_config()` without an arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(ROOT, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {spec.partition(':')[0]!r} not found (from {os.getcwd()} or {ROOT}).")
    module_spec = importlib.util.spec_from_file_location("lalign_experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
