"""Entry point: `python -m lalign.main --config=configs/demo.py --workdir=DIR [--config.total_steps=100]`."""
from absl import app, flags, logging
from ml_collections import config_flags

from lalign import allocator

config_flags.DEFINE_config_file("config", None, "Experiment config file (a `get_config(arg)` module).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and summary.json go.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (every host of a multi-host "
                  "TPU slice runs the same command; see launch/README.md).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; our progress lines are enough
    if flags.FLAGS.distributed:
        import jax

        jax.distributed.initialize()  # coordinator and process ids from the TPU/GPU environment
    from lalign import pipeline  # after flag parsing: keeps --help fast

    pipeline.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    allocator.use_tcmalloc()  # re-runs this command with tcmalloc when installed: see lalign/allocator.py
    app.run(main)
