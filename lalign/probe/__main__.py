"""`python -m lalign.probe --config=configs/probe/coco_stuff.py --config.backbone=PATH --workdir=DIR`."""
from absl import flags, logging
from ml_collections import config_flags

from lalign import allocator, cli
from lalign.probe.run import run

# Defined only when run as a program: importing lalign.probe (as lalign.pipeline does, beside lalign.main's own
# --config) defines no flags.
config_flags.DEFINE_config_file("config", None, "Probe config file, e.g. configs/probe/coco_stuff.py[:smoke].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where results.json, per_class.md (and features/ if stored on disk) go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    run(flags.FLAGS.config, flags.FLAGS.workdir)


def console() -> None:
    """`lalign-probe` / `python -m lalign.probe`."""
    allocator.use_tcmalloc()  # feature extraction and probe training run on the CPU too: lalign/allocator.py
    cli.run_absl("probe", main)


if __name__ == "__main__":
    console()
