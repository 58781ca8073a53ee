"""The command line `python -m lalign.report --workdirs RUN ... --out DIR` (the package docstring says what it
writes); `lalign.report.main` and `lalign.report.__main__` both run it."""
import argparse
import os

from lalign import log
from lalign.report import __doc__ as DOC  # the package's docstring is set before its imports run
from lalign.report.render import write_report


def main(argv=None) -> int:
    """`python -m lalign.report` with `argv` (for tests and scripts)."""
    p = argparse.ArgumentParser(prog="python -m lalign.report", description=DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdirs", nargs="+", required=True, help="pipeline workdirs (read only)")
    p.add_argument("--out", required=True, help="report directory (report.md, PNGs, report.json)")
    p.add_argument("--group-by", nargs="*", default=None,
                   help="config keys (dotted, e.g. maskembed.target_layer) to group by; default: the keys that differ")
    p.add_argument("--no-pca", action="store_true", help="skip the PCA maps (no model is loaded)")
    p.add_argument("--pca-runs", type=int, default=4, help="PCA figures for the first run of up to this many groups")
    p.add_argument("--pca-images", type=int, default=4, help="held-out scenes per PCA figure")
    p.add_argument("--pca-fit", type=int, default=64, help="held-out scenes whose patches the PCA is fit on")
    p.add_argument("--title", default="lalign report")
    args = p.parse_args(argv)
    data = write_report(args.workdirs, args.out, args.group_by, not args.no_pca, args.pca_runs, args.pca_images,
                        args.pca_fit, args.title)
    log.info(f"[report] {len(data['runs'])} run(s), {len(data['groups'])} group(s) -> "
             f"{os.path.join(args.out, 'report.md')}")
    return 0
