"""The GPU check: one JSON document saying whether the GPU paths work, how fast they are and where the time goes.

    bash launch/gpu_check.sh                        # on one GPU, under 9 minutes (--budget-minutes, default 8)
    bash launch/gpu_check.sh --dry-run              # on a CPU: every step on a tiny model (CI runs this)
    bash launch/gpu_check.sh --models DiT-XL/2-8E2A --batches 32,64 --budget-minutes 4    # a narrower rerun

It runs, in order:
1. the `gpu`-marked tests (pytest -m gpu): a whole training step without a host synchronisation, the MoE forward
   without one (on a CPU they are collected and skipped: the dry run checks they exist);
2. `attention`: per attention shape of the models (DiT-XL: 16 heads of 72 dims, 256 tokens), forward + backward of
   scaled_dot_product_attention under every model.attention kernel (auto, flash, efficient, cudnn, math; those the
   device cannot run are recorded with PyTorch's reason) at the sweep's first batch, the fastest, and auto against it;
   --attention KERNEL then runs the training configurations with it;
3. training configurations in bf16 (fp32 in the dry run) with the trainer's own loss and the one-process engine,
   for DiT-XL/2 and DiT-XL/2-8E2A, in stages: both models' first row, then both models' second row, and so on
   (a budget that runs out still leaves every model measured), the rows of a model being:
     "<model> eager"                     torch.compile off, unmasked
     "<model> compiled"                  train.compile=true (torch.compile's default mode), unmasked
     "<model> mask 0.75 token budget"    mask ratio 0.75 at the same tokens per step as the unmasked sweep: each
                                         point holds batch × tokens / kept images (4×), compiled as the row above;
                                         per point `vs_unmasked` divides its images/s and tokens/s by the row
                                         above's at the same tokens per step (the record's: its fastest such point)
     "<model> compiled reduce-overhead"  train.compile_mode=reduce-overhead (CUDA graphs), at the best batch of
                                         "<model> compiled" only
   Every configuration builds its model once and sweeps the batch per GPU (32, 64, 128, 256 images; dry: 2, 4),
   stopping at the first batch that does not fit (an `out_of_memory` point, not a failure). A model whose fp32
   weights, EMA, gradients and AdamW moments (20 bytes a parameter) exceed the device's memory is not built (DiT-XL/2-
   8E2A's 78 GiB: run it on an H200), nor is one whose smallest batch did not fit in an earlier row; without a C
   compiler or Python.h (Triton needs both) the compiled rows are skipped with that reason. Per point: images/s,
   kept tokens/s, MFU (against the device's bf16 peak, FLOPs of what runs), peak device memory, host syncs counted
   over one step (torch.cuda.set_sync_debug_mode); per configuration `best` (the highest images/s: batch, images/s,
   tokens/s, MFU) and a torch.profiler `profile` of a few steps at that batch (`dit_scale.benchmarks.profiling`): shares
   of the kernel time in gemm / attention / elementwise_norm / optimizer / communication / other, the idle share of the
   profiled wall time (no kernel running), the 15 most expensive kernels (in the dry run: CPU ops and their CPU time);
   optimizer is what the step runs in profiling.OPTIMIZER_RANGE: clipping, AdamW, the EMA update.
   With torch.compile the first batch compiles static shapes and the next ones a dynamic batch dimension
   (torch.compile's automatic dynamic shapes); every configuration starts from a fresh compile cache;
4. `table`: one line per configuration and attention shape for a reader, and whether no counted step synchronised
   with the host.

The tests run with a limit (2 min each, 4 min together): a hang is a failed stage, not the device time gone.
Time budget: a configuration, sweep point or profile whose estimate (from what ran before) would end past
--budget-minutes from the start is skipped and recorded as skipped for time. The JSON (--out) is rewritten after
every sweep point, so a run cut off still leaves its results. In the dry run the compiled configurations run for the
first model only, at the first batch, and the token-budget rows are eager (compiling costs ~30 s a graph on a CPU);
without a C++ compiler they are recorded as skipped, with the reason. The exit code is 0 when every test passed and
every configuration that fits and had time ran without an error.
"""
import argparse
import sys

from dit_scale.cli import check_output_file, non_negative_int, positive_int, positive_int_list
from dit_scale.errors import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU: a tiny model, a tiny sweep, fp32")
    parser.add_argument("--models", default=None,
                        help="models, comma-separated (default DiT-XL/2,DiT-XL/2-8E2A; dry DiT-XS/4,DiT-XS/4-4E2A)")
    parser.add_argument("--batches", type=positive_int_list, default=None,
                        help="images per GPU to sweep, comma-separated (default 32,64,128,256; dry 2,4)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps per sweep point (default 5; dry 2)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="warm-up steps per sweep point (default 2)")
    parser.add_argument("--profile-steps", type=non_negative_int, default=None,
                        help="profiled steps at each configuration's best batch (default 3; dry 2; 0: no profile)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="skip what would end later than this after the start (default 8; dry 10)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    parser.add_argument("--attention", default="auto",
                        help="model.attention of the training configurations: auto, flash, efficient, cudnn or "
                             "math (default auto; the attention rows time every kernel)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file (after every sweep point)")
    args = parser.parse_args(argv)
    try:
        check_output_file(args.out, "--out")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch     # after the arguments, as is the check itself (seconds of imports)

    from dit_scale.benchmarks.gpu_check import run, write
    from dit_scale.models.layers import ATTENTION_BACKENDS
    from dit_scale.models.registry import parse_model_name
    for name in args.models.split(",") if args.models else ():
        try:
            parse_model_name(name)
        except KeyError as e:
            print(f"error: --models: {e.args[0]}", file=sys.stderr)
            return 2
    if args.attention not in ATTENTION_BACKENDS:
        print(f"error: --attention {args.attention} is not a backend; choose one of: "
              f"{', '.join(ATTENTION_BACKENDS)}.", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device is visible; run with --dry-run on a CPU.", file=sys.stderr)
        return 2
    result = run(args)
    print(write(result, args.out))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
