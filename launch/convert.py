"""Convert a public DiT / DiT-MoE checkpoint into dit_scale's format (weights + resolved config), or back.

    python launch/convert.py --from dit DiT-XL-2-256x256.pt --model DiT-XL/2 --out dit-xl-2-256.safetensors
    python launch/convert.py --from dit-moe dit_moe_s_8E2A.pt --model DiT-S/2-8E2A --objective ddpm \
        --out s8e2a.safetensors
    python launch/convert.py --from dit-moe rf_ckpt.pt --model DiT-B/2-8E2A --objective flow --out b-rf.safetensors
    python launch/convert.py --to dit dit-xl-2-256.safetensors --out DiT-XL-2-256x256.pt      # our file -> theirs

--from: `dit` (facebookresearch/DiT: dense, DDPM, learned sigma) or `dit-moe` (feizc/DiT-MoE; --objective ddpm for
its S/2 and B/2 releases, flow for rectified-flow training: time scale 1, logit-normal t, the velocity half of the
readout). CKPT is a release file (the EMA state dict), a training checkpoint ({"model", "ema", ...}: --weights auto
takes the EMA) or a .safetensors state dict. The size comes from the weights and is checked against --model (which
gives the heads; a custom size: add model.num_heads=H). Trailing key=value overrides are applied to the written
config (e.g. data.path=/data/in1k-256 for the fine-tune). The output is what launch/export.py writes: use it with
launch/sample.py --ckpt, train.init_from=, or launch/upcycle.py. --to writes our file back in their layout (a plain
state dict, torch.save). Exit code 2 with one sentence on a bad source.
"""
import argparse
import sys

from dit_scale.cli import check_output_file
from dit_scale.errors import CheckpointError, ConfigError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="src", choices=("dit", "dit-moe"), help="format of CKPT to import")
    way.add_argument("--to", dest="dst", choices=("dit", "dit-moe"), help="export our CKPT in that layout")
    p.add_argument("ckpt", help="the checkpoint to convert")
    p.add_argument("--model", help="registry name it was trained as, e.g. DiT-XL/2 or DiT-S/2-8E2A (--from)")
    p.add_argument("--objective", choices=("ddpm", "flow"), help="how it was trained (--from dit-moe)")
    p.add_argument("--weights", choices=("auto", "ema", "model"), default="auto",
                   help="of a training checkpoint: auto = the EMA when it has one")
    p.add_argument("--out", required=True, help="output .safetensors (--from) or .pt (--to)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for the written config (--from)")
    args = p.parse_intermixed_args(argv)      # CKPT, options and key=value overrides in any order
    try:
        if args.dst:
            check_output_file(args.out, "--out")
            return _export(args)
        if not args.model:
            raise ConfigError("--from needs --model, the registry name the checkpoint was trained as (e.g. DiT-XL/2).")
        check_output_file(args.out, "--out", (".safetensors",))
        from dit_scale.convert import convert, fill_model, save_weights
        weights, cfg, which = convert(args.src, args.ckpt, args.model, args.objective, args.overrides, args.weights)
        model = fill_model(cfg, weights, source=args.ckpt)
        save_weights(model, cfg, args.out, source=f"{args.src}:{args.ckpt}", which=which)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = cfg.diffusion
    what = "its state dict" if which == "weights" else f"{which} weights"
    flow = f", time_scale {d.time_scale:g}, t {d.t_sampling}" if d.objective == "flow" else ""
    print(f"{args.out}: {cfg.model.name} ({sum(v.numel() for v in model.parameters()) / 1e6:.1f}M params) from "
          f"{args.src} ({what}); {d.objective}{flow}, learn_sigma {cfg.model.learn_sigma}; config "
          f"{args.out[:-len('.safetensors')]}.yaml")
    return 0


def _export(args) -> int:
    from dit_scale.convert import export_file
    cfg, count = export_file(args.dst, args.ckpt, args.out)
    print(f"{args.out}: {cfg.model.name} in {args.dst}'s layout ({count} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
