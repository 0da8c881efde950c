"""Train a DiT / DiT-MoE.

    python launch/train.py --config configs/quickstart.yaml
    python launch/train.py --config configs/quickstart.yaml train.steps=100 train.run_dir=runs/short moe.top_k=1
    torchrun --nproc_per_node 2 launch/train.py --config configs/quickstart.yaml parallel.engine=fsdp parallel.ep=2
    torchrun --nproc_per_node 2 launch/train.py --config configs/quickstart.yaml parallel.engine=deepspeed parallel.ep=2

Arguments after the config file are `key=value` overrides of any config field (every key: docs/config.md).
Exit codes:
    0   done (train.steps reached, final checkpoint written)
    2   configuration / input error, e.g. a bad key or a corrupt checkpoint (one sentence on stderr)
    3   training aborted (train.max_bad_steps non-finite steps in a row)
    75  EX_TEMPFAIL: interrupted by SIGTERM / SIGUSR1 / SIGHUP or train.max_wall_minutes; every rank saved a
        checkpoint at the current step. Requeue the same command with train.resume=auto to continue (e.g.
        `scontrol requeue`).
    130 interrupted by SIGINT (Ctrl-C): saved like 75 (run again with train.resume=auto); a second Ctrl-C exits at
        once without saving (one line says what is lost).
"""
import argparse
import os
import sys

from dit_scale.training.preemption import catch_early_signals

catch_early_signals()       # before the heavy imports: a stop signal (or Ctrl-C) during start-up is kept

from dit_scale.config import load_config  # noqa: E402  (no torch: a config mistake is reported at once)
from dit_scale.errors import CheckpointError, ConfigError  # noqa: E402
from dit_scale.parallel.shutdown import end_process_group, run_main  # noqa: E402  (no torch)
from dit_scale.training.preemption import TrainingInterrupted  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment config (may name a base: file)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The trainer's imports (torch) take seconds: a mistake in the config is reported first.
    from dit_scale.training.trainer import TrainingAborted, train
    try:
        summary = train(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"aborted: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"interrupted: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        end_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print({k: round(v, 5) if isinstance(v, float) else v for k, v in summary.items()})
    return 0


if __name__ == "__main__":
    run_main(main)          # after a distributed run: exits without the interpreter's teardown (parallel/shutdown.py)
