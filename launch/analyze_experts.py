"""Where do the experts go? Run the EMA model of a run's latest checkpoint on held-out data at fixed timestep bins and
write the token share of every expert per layer × timestep bin and per layer × class, with the balance per bin
(max/mean load, entropy), as JSON and heatmaps (`dit_scale/evaluation/experts.py` says what is measured).

    python launch/analyze_experts.py runs/quickstart
    python launch/analyze_experts.py runs/in1k --shards data/in1k-val --bins 20 --num-samples 5000 --device cuda

Writes RUN/analysis/experts_step<N>/ (or --out): experts.json, share_by_t.png, share_by_class.png, balance_by_t.png.
Held-out data: --shards, else the run's eval.val_path, else its data.path.

Exit codes: 0 done; 2 an input error (no checkpoint, a dense model, unreadable shards), one sentence on stderr.
"""
import argparse
import sys

from dit_scale.cli import check_output_dir, positive_int
from dit_scale.errors import CheckpointError, ConfigError, DataError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (its latest checkpoint) or a checkpoint (step_* folder or .pt)")
    p.add_argument("--shards", default=None, help="held-out shards (default: eval.val_path, else data.path)")
    p.add_argument("--bins", type=positive_int, default=10, help="timestep bins (centres (k + 0.5) / bins)")
    p.add_argument("--num-samples", type=positive_int, default=1000, help="first N held-out samples")
    p.add_argument("--batch-size", type=positive_int, default=None, help="samples per forward (default: eval.val_batch_size)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/analysis/experts_step<N>)")
    p.add_argument("--no-ema", action="store_true", help="the trained weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)
    from dit_scale.evaluation.experts import analyze_experts     # after the arguments: it imports torch
    from dit_scale.parallel.topology import pick_device
    try:
        check_output_dir(args.out, "--out")
        rep = analyze_experts(args.run, shards=args.shards, bins=args.bins, num_samples=args.num_samples,
                              batch_size=args.batch_size, out_dir=args.out, ema=not args.no_ema,
                              device=pick_device(args.device))
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rep["json"])
    for path in rep["figures"]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
