"""Entry point: `python -m lalign.main --config=configs/demo.py --workdir=DIR [--config.total_steps=100]`."""
from absl import app, flags, logging
from ml_collections import config_flags

from lalign import allocator, cli

config_flags.DEFINE_config_file("config", None, "Experiment config file (a `get_config(arg)` module). Its fields, "
                                "defaults and meanings: `python -m lalign.config configs/NAME.py`.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and summary.json go.")
flags.DEFINE_bool("distributed", False, "Join a multi-host job first (every host runs the same command; "
                  "lalign/distributed.py, launch/README.md).")
flags.DEFINE_string("coordinator_address", "", "--distributed: host:port of process 0 (default: "
                    "$JAX_COORDINATOR_ADDRESS, else detected on Cloud TPU / SLURM / ...).")
flags.DEFINE_integer("num_processes", None, "--distributed: number of hosts (default: $JAX_NUM_PROCESSES or detected).")
flags.DEFINE_integer("process_id", None, "--distributed: this host's index (default: $JAX_PROCESS_ID or detected).")
flags.DEFINE_integer("distributed_timeout", 300, "--distributed: seconds to wait for every host to join.")
flags.DEFINE_integer("heartbeat_timeout", 100, "--distributed: seconds after which a silent (dead) host stops the "
                     "others, which then exit naming it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; our progress lines are enough
    f = flags.FLAGS
    if not f.distributed and (f.coordinator_address or f.num_processes is not None or f.process_id is not None):
        raise app.UsageError("--coordinator_address/--num_processes/--process_id need --distributed.")
    if f.distributed:
        from lalign import distributed  # lazy: jax's distributed runtime only for a multi-host job

        distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                               initialization_timeout_s=f.distributed_timeout,
                               heartbeat_timeout_s=f.heartbeat_timeout)
    from lalign import pipeline  # after joining the job, and after flag parsing: keeps --help fast

    pipeline.run(f.config, f.workdir)


def console() -> None:
    """`lalign-train` / `python -m lalign.main`."""
    allocator.use_tcmalloc()  # re-runs this command with tcmalloc when installed: see lalign/allocator.py
    cli.run_absl("main", main)


if __name__ == "__main__":
    console()
