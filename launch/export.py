"""Export a checkpoint's consolidated weights to safetensors, with the resolved config.

    python launch/export.py runs/quickstart --out model.safetensors --ema
    python launch/export.py runs/quickstart/checkpoints/step_00001500 --out model.safetensors

CKPT is a run directory (its latest checkpoint), a step_* checkpoint folder (sharded) or a step_*.pt file. Writes the raw weights, or the EMA with
--ema; experts stay stacked over their global index ([E, ...]). The resolved config is stored twice: as the
safetensors metadata key `config` (with `step` and `weights`) and as a sidecar `<out without .safetensors>.yaml`.
`launch/sample.py --ckpt model.safetensors` samples from the file. Exit code 2 on an unusable checkpoint.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dit_scale.checkpoint import CheckpointError, load_checkpoint  # noqa: E402


def export(ckpt: str, out: str, ema: bool = False) -> str:
    from safetensors.torch import save_file

    state = load_checkpoint(ckpt)
    weights = state["ema" if ema else "model"]
    tensors, seen = {}, set()
    for name, value in weights.items():
        value = value.detach().cpu().contiguous()
        key = (value.untyped_storage().data_ptr(), value.storage_offset())
        tensors[name] = value.clone() if key in seen else value    # safetensors refuses shared storage
        seen.add(key)
    metadata = {"format": "dit_scale", "config": state["config"], "step": str(int(state["step"])),
                "weights": "ema" if ema else "model"}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata=metadata)
    with open(os.path.splitext(out)[0] + ".yaml", "w") as f:
        f.write(state["config"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="run directory, step_* checkpoint folder or step_*.pt file")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"error: --out '{args.out}' must end with .safetensors.", file=sys.stderr)
        return 2
    try:
        print(export(args.ckpt, args.out, args.ema))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
