"""Upcycle a dense DiT into a DiT-MoE whose output at conversion equals the dense model's.

    python launch/upcycle.py dit-xl-2-256.safetensors --experts 8 --top-k 2 --out dit-xl-2-8e2a.safetensors
    python launch/upcycle.py runs/dense --experts 8 --top-k 2 --shared-ratio 2 --noise 0.01 --out up.safetensors
    python launch/upcycle.py dense.safetensors --experts 8 --top-k 8 --mode split --shared-ratio 1 \
        --calib-data /data/in1k-256 --calib-batches 8 --out split.safetensors                      # Dense2MoE

DENSE_CKPT: anything of ours holding a dense DiT with its config — a run directory, a checkpoint (its EMA), an
export (launch/export.py) or a converted file (launch/convert.py --from dit). The experts are GELU MLPs like the
dense FFN (moe.expert_act=gelu; no SwiGLU computes a GELU MLP exactly), routing is token choice with the top-k
weights renormalised (moe.normalize_topk=true). --mode copy (default): every routed expert is the dense FFN, the
router its init, a shared expert (--shared-ratio > 0) adds 0 — exact; --noise perturbs the copies (not exact).
--mode split (Dense2MoE): the FFN's hidden units split into the experts, the most important (Taylor score on
--calib-data) into the shared expert — exact when --top-k equals --experts, an approximation otherwise. After
writing, the output is compared with the dense model on a random batch (skip with --no-check) and the largest
difference printed. Trailing key=value overrides go into the written config. Fine-tune the result with
`launch/train.py --config OUT.yaml train.init_from=OUT.safetensors ...`. Exit code 2 with one sentence on bad input.
"""
import argparse
import sys

from dit_scale.cli import check_output_file, positive_int
from dit_scale.errors import CheckpointError, ConfigError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dense", help="dense DiT: run directory, checkpoint, export or converted .safetensors")
    p.add_argument("--experts", type=positive_int, required=True, help="routed experts per block (E)")
    p.add_argument("--top-k", type=positive_int, required=True, help="experts per token (k)")
    p.add_argument("--shared-ratio", type=float, default=0.0, help="shared expert hidden / width (0: none)")
    p.add_argument("--mode", choices=("copy", "split"), default="copy")
    p.add_argument("--noise", type=float, default=0.0, help="copy: relative noise std on each copy (0: exact)")
    p.add_argument("--router-std", type=float, default=None, help="router init std (default: the model's, 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-data", help="split: shards for the Taylor importance (default: the config's data.path)")
    p.add_argument("--calib-batches", type=positive_int, default=8)
    p.add_argument("--calib-batch-size", type=positive_int, default=16)
    p.add_argument("--no-check", action="store_true", help="skip the dense-vs-upcycled comparison")
    p.add_argument("--out", required=True, help="output .safetensors (a sidecar .yaml is written beside it)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the written config")
    args = p.parse_intermixed_args(argv)      # CKPT, options and key=value overrides in any order
    from dit_scale.build import build_model
    from dit_scale.convert import read_ours, save_weights
    from dit_scale.convert.upcycle import UpcycleSpec, calibration_scores, max_difference, upcycle
    try:
        check_output_file(args.out, "--out", (".safetensors",))
        spec = UpcycleSpec(args.experts, args.top_k, args.shared_ratio, args.mode, args.noise, args.router_std,
                           args.seed)
        weights, dense_cfg = read_ours(args.dense, "DENSE_CKPT")
        dense = None
        if args.mode == "split" or not args.no_check:
            dense = build_model(dense_cfg)
            dense.load_state_dict(weights)
            dense.eval()
        scores = calibration_scores(dense, dense_cfg, data=args.calib_data, batches=args.calib_batches,
                                    batch_size=args.calib_batch_size, seed=args.seed) if args.mode == "split" else None
        model, cfg = upcycle(weights, dense_cfg, spec, args.overrides, scores)
        save_weights(model, cfg, args.out, source=f"upcycle:{args.dense}", which="model",
                     extra={"upcycle": repr(spec)})
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = f"{args.out}: {cfg.model.name} ({args.mode}, GELU experts of {cfg.moe.expert_hidden}, shared " \
           f"{cfg.moe.shared_hidden}, normalised top-{cfg.moe.top_k}); config {args.out[:-len('.safetensors')]}.yaml"
    if not args.no_check:
        line += f"; max |MoE - dense| on a random batch: {max_difference(dense, model, cfg.model, args.seed):.3g}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
