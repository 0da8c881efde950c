"""Parameter counts and forward GFLOPs of a registry model, without allocating its weights.

    python launch/model_info.py --model DiT-XL/2 --json
    python launch/model_info.py --model DiT-XL/2-8E2A --json
    python launch/model_info.py --all            # the whole registry as a table

GFLOPs are forward multiply-adds per image at 256×256 (a 32×32×4 latent) with DiT's learned-sigma output
(8 channels), the DiT paper's convention; change with --input-size / --in-channels / --out-channels.
"""
import argparse
import json
import sys

from dit_scale.errors import ConfigError
from dit_scale.models.registry import list_models


def info_for(name, args):
    from dit_scale.build import model_args
    from dit_scale.config import load_config
    from dit_scale.models.flops import model_info
    cfg = load_config(None, [f"model.name={name}", f"model.input_size={args.input_size}",
                             f"model.in_channels={args.in_channels}"] + args.overrides)
    info = {"model": name, **model_info(model_args(cfg).replace(out_channels=args.out_channels))}
    info["gflops"] = round(info["gflops"], 2)
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--all", action="store_true", help="print every registry model")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--out-channels", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. moe.shared_mlp_ratio=0")
    args = parser.parse_args(argv)
    try:
        rows = [info_for(n, args) for n in (list_models() if args.all else [args.model])]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json and not args.all:
        print(json.dumps(rows[0]))
        return 0
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['model']:<18} params {r['params'] / 1e6:9.1f}M  active {r['active_params'] / 1e6:9.1f}M  "
                  f"{r['gflops']:8.2f} GFLOPs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
