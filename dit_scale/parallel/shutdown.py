"""How a process that ran collectives ends. No torch import: the entry points import this before torch.

    if __name__ == "__main__":
        run_main(main)                  # main() returns the exit code; it may call end_process_group() itself

Without a process group, `run_main` is `sys.exit(main())`. With one, the group is destroyed, the atexit handlers run
(the loaders' workers, wandb, logging, multiprocessing), stdout and stderr are flushed, and the process ends with
`os._exit`, without the interpreter's teardown. Why: torch keeps process groups alive after destroy_process_group (a
DeviceMesh that DTensor's dispatch caches still hold keeps its group), and with them their gloo / NCCL threads. A
thread that drops the last reference to a Python-owned tensor while the interpreter finalises takes the GIL of a
dying interpreter, and the process aborts at random ("terminate called without an active exception", SIGABRT;
pytorch/pytorch#190489) after a run that finished and saved everything. The teardown has nothing left to do for a
finished command: the trainer and the evaluator close their files before main returns.

An exception out of `main` destroys the group and propagates as usual (a traceback, exit code 1).
"""
from __future__ import annotations

import atexit
import os
import sys
from typing import Callable, NoReturn

_ended_a_group = False      # set by end_process_group: this process had a process group


def end_process_group() -> None:
    """Destroy this process's process groups, if it has any (torch.distributed initialised)."""
    global _ended_a_group
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _ended_a_group = True


def exit_now(code: int) -> NoReturn:
    """Exit with `code` as Python would (atexit handlers, flushed stdout / stderr), minus the interpreter's teardown."""
    atexit._run_exitfuncs()     # what Py_FinalizeEx runs first; the teardown it then does is what is skipped
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):       # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)


def run_main(main: Callable[[], int]) -> NoReturn:
    """Run an entry point's `main` and exit with its code (module docstring)."""
    try:
        code = main()
    finally:
        end_process_group()
    if not _ended_a_group:
        sys.exit(code)
    exit_now(code)
