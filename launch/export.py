"""Export a checkpoint's consolidated weights to safetensors, with the resolved config.

    python launch/export.py runs/quickstart --out model.safetensors --ema
    python launch/export.py runs/quickstart/checkpoints/step_00001500 --out model.safetensors

CKPT is a run directory (its latest checkpoint), a step_* checkpoint folder (sharded) or a step_*.pt file. Writes the raw weights, or the EMA with
--ema; experts stay stacked over their global index ([E, ...]). The resolved config is stored twice: as the
safetensors metadata key `config` (with `step` and `weights`) and as a sidecar `<out without .safetensors>.yaml`.
`launch/sample.py --ckpt model.safetensors` samples from the file. Exit code 2 on an unusable checkpoint.
"""
import argparse
import sys

from dit_scale.cli import check_output_file
from dit_scale.errors import CheckpointError, ConfigError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="run directory, step_* checkpoint folder or step_*.pt file")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    args = p.parse_args(argv)
    try:
        check_output_file(args.out, "--out", (".safetensors",))
        from dit_scale.checkpoint import export     # after the arguments: it imports torch
        print(export(args.ckpt, args.out, args.ema))
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
