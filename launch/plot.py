"""Draw the curves of one or more runs from their metrics.jsonl: training loss, validation loss, FID (PNG), so runs
can be compared without online wandb.

    python launch/plot.py runs/quickstart
    python launch/plot.py runs/a runs/b --out compare.png --x hours --metrics loss,val_loss,fid,inception_score

One panel per metric, one line per run (FID, sFID, IS, precision, recall: one line per run and sample count, e.g.
FID-50000, since they depend on it).
--x step (default) or hours: wall-clock hours since the run's first row (metrics rows carry `time`, Unix seconds).
Rows without a metric are skipped for that panel; skipped steps (loss null) leave gaps.

Exit codes: 0 done; 2 a run without metrics.jsonl or no metric to draw (one sentence on stderr).
"""
import argparse
import sys

from dit_scale.cli import check_output_file
from dit_scale.errors import ConfigError
from dit_scale.evaluation.curves import plot


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default=None, help="PNG to write (default: FIRST_RUN/curves.png)")
    p.add_argument("--metrics", default="loss,val_loss,fid", help="comma-separated metrics keys, one panel each")
    p.add_argument("--x", choices=("step", "hours"), default="step")
    args = p.parse_args(argv)
    try:
        check_output_file(args.out, "--out")
        print(plot(args.runs, args.out, [m for m in args.metrics.split(",") if m], args.x))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
