"""How every lalign command line behaves: `--help` prints the usage and exits 0; a user error (a bad flag, a
missing file, a config or checkpoint that does not fit) is one line `lalign.<tool>: error: ...` and exit code 2;
anything else keeps its traceback. `LALIGN_TRACEBACK=1` shows the traceback of a user error too.

The tools that take an experiment config (`main`, `probe`, `bench`, `memory`) parse absl flags, as big_vision's
and ml_collections' `config_flags` do; the converters and reports (`export`, `report`, the pod rehearsal) take
argparse options. Both go through here.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

from absl import app, flags

HELP = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def is_user_error(e: BaseException) -> bool:
    """What a user can fix (config, paths, checkpoints, the job's hosts): reported as one line."""
    # lazy: every command imports lalign.cli first; these bring in orbax and JAX, which `--help` does not need
    from lalign.checkpoints.manager import CheckpointError
    from lalign.distributed import JoinError

    return isinstance(e, (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, CheckpointError,
                          JoinError))


def report(tool: str, e: BaseException, where: bool = True) -> int:
    """Prints `e` as the one-line error of `tool` (with the LALIGN_TRACEBACK hint when `where`); returns 2."""
    hint = "  (LALIGN_TRACEBACK=1 shows where)" if where and not os.environ.get("LALIGN_TRACEBACK") else ""
    print(f"lalign.{tool}: error: {e}{hint}", file=sys.stderr, flush=True)
    return 2


def returning(tool: str, fn: Callable, *args):
    """`fn(*args)`, or the exit code 2 once a user error is reported by `report` (the argparse tools)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - sorted by is_user_error
        if not is_user_error(e) or os.environ.get("LALIGN_TRACEBACK"):
            raise
        return report(tool, e, where=False)


def _one_line(message: str) -> str:
    """A flag error as one line: config_flags puts the config file's whole traceback into its message."""
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.startswith("  File ")]
    if len(lines) <= 1:
        return message.strip()
    return f"{lines[0].rstrip(':')}: {lines[-1]}"


def run_absl(tool: str, main: Callable, argv: Optional[Sequence[str]] = None) -> None:
    """`absl.app.run(main)` with lalign's behaviour: --help exits 0, a flag error is one line and exit 2, and
    user errors raised by `main` are one line and exit 2."""
    argv = list(sys.argv if argv is None else argv)

    def parse(args):
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            sys.exit(report(tool, _one_line(str(e)), where=False))
        except (AttributeError, KeyError) as e:  # an override of a field the config does not have
            sys.exit(report(tool, f"the config has no field {e} (a --config.* override names it)", where=False))
        except (TypeError, ValueError) as e:  # an override the field cannot take
            sys.exit(report(tool, f"a --config.* override does not fit its field: {e}", where=False))

    def checked_main(args):
        try:
            return main(args)
        except Exception as e:  # noqa: BLE001 - sorted below
            if os.environ.get("LALIGN_TRACEBACK"):
                raise
            if is_user_error(e):
                sys.exit(report(tool, e, where=True))
            if isinstance(e, OSError) and "config" in str(e):  # config_flags reads the file on first use
                sys.exit(report(tool, f"--config: {_one_line(str(e)).split(': ', 1)[-1]}", where=False))
            raise

    try:
        app.run(checked_main, argv=argv, flags_parser=parse)
    except SystemExit as e:
        if e.code == 1 and any(a in HELP for a in argv[1:]):  # absl exits 1 after printing the help
            sys.exit(0)
        raise
