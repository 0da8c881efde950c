"""Train a DiT / DiT-MoE.

    python launch/train.py --config configs/quickstart.yaml
    python launch/train.py --config configs/quickstart.yaml train.steps=100 train.run_dir=runs/short moe.top_k=1
    torchrun --nproc_per_node 2 launch/train.py --config configs/quickstart.yaml parallel.engine=fsdp parallel.ep=2

Arguments after the config file are `key=value` overrides of any config field (see dit_scale/config.py).
Exit codes: 0 done, 2 configuration / input error (one sentence on stderr), 3 training aborted (non-finite losses).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dit_scale.checkpoint import CheckpointError  # noqa: E402
from dit_scale.config import ConfigError, load_config  # noqa: E402
from dit_scale.trainer import TrainingAborted, train  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment config (may name a base: file)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"aborted: {e}", file=sys.stderr)
        return 3
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print({k: round(v, 5) if isinstance(v, float) else v for k, v in summary.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
