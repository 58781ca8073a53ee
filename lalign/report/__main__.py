"""`python -m lalign.report --workdirs RUN ... --out DIR` (the package docstring says what it writes)."""
import sys

from lalign import cli
from lalign.report.command import main


def console() -> None:
    """`lalign-report` / `python -m lalign.report`."""
    sys.exit(cli.returning("report", main))


if __name__ == "__main__":
    console()
