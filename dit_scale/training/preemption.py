"""Preemption: SIGTERM / SIGUSR1 / SIGHUP or `train.max_wall_minutes` → every rank saves at the same step and exits
75; SIGINT (Ctrl-C) saves the same way and exits 130, and a second SIGINT exits 130 at once, without saving.

    preemption = Preemption(cfg.train.max_wall_minutes)
    with preemption:                             # handlers installed (main thread), restored on exit
        ...
        votes = preemption.vote_tensor(device)   # this rank's vote, all-reduced with the step's other flags
        if preemption.agreed(all_reduced_votes): save, then raise TrainingInterrupted

The handlers only set a flag; the ranks agree through an all-reduce the step already does (no extra collective),
so every rank stops at the same step boundary. On CUDA the agreed vote is copied to the host without blocking and
read one step later (waiting only for the previous step), so the check adds no pipeline stall.

Start-up: a scheduler may signal the job while it is still importing torch, building the model or starting the
loader. `catch_early_signals()` (launch/train.py calls it before any heavy import; this module imports torch only
when a vote is taken, for that reason) remembers such a signal, and the first training step votes to stop: the run
saves at step 1 and exits 75 instead of dying with 143. A start-up that reaches no step within
`START_UP_GRACE_S` (60 s; environment DIT_SCALE_START_UP_GRACE_S) of the signal exits 75 at once (130 after Ctrl-C),
saying that nothing was trained, rather than ignoring the signal until the scheduler's SIGKILL.

Interactive runs: SIGHUP (an SSH session dropped) is treated like SIGTERM. The first SIGINT (Ctrl-C) stops the run
like a preemption but exits 130 (run again with train.resume=auto); a second one ends the process at once with one
line saying what is lost (the steps after the newest checkpoint).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)
# A stop signal before this process's first training step: if no step boundary comes within this many seconds
# (a start-up still reading data, loading a checkpoint or compiling), exit at once: nothing is trained, nothing lost.
START_UP_GRACE_S = float(os.environ.get("DIT_SCALE_START_UP_GRACE_S", "60"))
EXIT_REQUEUE = 75    # EX_TEMPFAIL (sysexits.h): checkpoint saved, requeue with train.resume=auto
EXIT_SIGINT = 130    # 128 + SIGINT, the shell's code for Ctrl-C: checkpoint saved (first) or nothing saved (second)
_early: list = []    # names of stop signals that arrived before the training loop's handlers


def _stop_at_once(lost: str) -> None:
    """A second SIGINT: exit 130 now, without saving, with one line saying what is lost (rank 0 says it)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"interrupted: a second SIGINT (Ctrl-C) stopped the run at once, without saving; {lost}",
              file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_SIGINT)


class _StartUpWatchdog:
    """Armed by a stop signal that arrives before this process's first training step; disarmed by that step. If the
    grace runs out first, the process exits 75 (130 after Ctrl-C) with one line: a start-up that cannot reach a step
    soon (data that never arrives, a slow checkpoint load or compile) would otherwise outlive the scheduler's grace
    and be killed with nothing said."""

    def __init__(self):
        self.timer: Optional[threading.Timer] = None
        self.stepped = False

    def arm(self, name: str) -> None:
        if self.stepped or self.timer is not None:
            return
        self.timer = threading.Timer(START_UP_GRACE_S, self._give_up, args=(name,))
        self.timer.daemon = True
        self.timer.start()

    def step_done(self) -> None:
        self.stepped = True
        if self.timer is not None:
            self.timer.cancel()

    @staticmethod
    def _give_up(name: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"interrupted: {name} during start-up and no training step within {START_UP_GRACE_S:g} s; nothing "
                  f"was trained yet, so nothing is saved or lost; run again with train.resume=auto to continue.",
                  file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_SIGINT if name == "SIGINT" else EXIT_REQUEUE)


_watchdog = _StartUpWatchdog()


def _on_early_signal(signum, frame) -> None:
    if signum == signal.SIGINT and "SIGINT" in _early:
        _stop_at_once("nothing was trained yet, so nothing is lost.")
    _early.append(signal.Signals(signum).name)
    _watchdog.arm(_early[-1])


def catch_early_signals() -> None:
    """Remember SIGTERM / SIGUSR1 / SIGHUP / SIGINT from now until the training loop installs its own handlers (main
    thread only); a second SIGINT exits at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in STOP_SIGNALS:
        signal.signal(s, _on_early_signal)


class TrainingInterrupted(Exception):
    """A stop signal or train.max_wall_minutes: every rank saved a checkpoint at `step`. `exit_code`: 130 after
    SIGINT (Ctrl-C: run again to continue), else 75 (requeue)."""

    def __init__(self, step: int, reason: str, path: str = "", unsaved: str = ""):
        """`unsaved`: why step `step` could not be saved (its weights followed a non-finite step); `path` is then the
        newest checkpoint, which the next start resumes from."""
        ctrl_c = reason.startswith("SIGINT")
        again = "run again with train.resume=auto" if ctrl_c else "requeue (train.resume=auto)"
        said = reason.replace('SIGINT', 'SIGINT (Ctrl-C)', 1) if ctrl_c else reason
        if unsaved:
            super().__init__(f"{said}: step {step} was not saved ({unsaved}); {again} to continue from "
                             f"{path or 'the start (no checkpoint yet)'}.")
        else:
            super().__init__(f"{said}: checkpoint saved at step {step}; {again} to continue.")
        self.step, self.reason, self.path = step, reason, path
        self.exit_code = EXIT_SIGINT if ctrl_c else EXIT_REQUEUE


class Preemption:
    def __init__(self, max_wall_minutes: float = 0.0, run_dir: Optional[str] = None):
        """`run_dir`: where a second SIGINT looks for the newest checkpoint, to say what it loses."""
        self.limit = float(max_wall_minutes)
        self.run_dir = run_dir
        self.t0 = time.monotonic()
        self.reason: Optional[str] = None       # set by a signal handler or the wall-time guard (a plain flag)
        self._previous = {}
        self._pending = None                    # (host copy, CUDA event) of the previous step's agreed vote

    def __enter__(self) -> "Preemption":
        """Install the handlers (main thread only: Python's rule)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def _on_signal(self, signum, frame) -> None:
        """Only sets the flag; a SIGINT after a first one (here or during start-up) exits at once."""
        self.wants_stop()
        if signum == signal.SIGINT and (self.reason or "").startswith("SIGINT"):
            _stop_at_once(self._lost())
        self.reason = signal.Signals(signum).name
        _watchdog.arm(self.reason)

    def _lost(self) -> str:
        """What a stop without saving loses: the steps after the newest checkpoint."""
        from dit_scale.checkpoint.storage import find_latest
        latest = find_latest(self.run_dir) if self.run_dir else None
        if latest is None:
            return "no checkpoint was saved yet, so every step trained is lost."
        return f"the steps after {latest} are lost (continue from it with train.resume=auto)."

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def wants_stop(self) -> bool:
        """This rank's vote (host only, no sync): a signal arrived (during start-up too) or the wall-time budget is
        spent."""
        if self.reason is None and _early:
            self.reason = f"{_early[0]} during start-up"
        if self.reason is None and self.limit and time.monotonic() - self.t0 > 60.0 * self.limit:
            self.reason = f"train.max_wall_minutes={self.limit:g} reached"
        return self.reason is not None

    def vote_tensor(self, device):
        import torch
        return torch.full((), float(self.wants_stop()), device=device)

    def agreed(self, votes) -> bool:
        """Whether any rank voted to stop (`votes`: the all-reduced sum). Every rank reads the same value, so all stop
        at the same step: directly on CPU, one step later on CUDA (see the module docstring)."""
        _watchdog.step_done()                   # a step boundary: a stop from now on saves (no start-up watchdog)
        if votes is None:
            return False
        if votes.device.type != "cuda":
            return bool(votes.item() > 0)
        import torch
        previous, self._pending = self._pending, (votes.to("cpu", non_blocking=True), torch.cuda.Event())
        self._pending[1].record()
        if previous is None:
            return False
        previous[1].synchronize()
        return bool(previous[0].item() > 0)

    def describe(self) -> str:
        return self.reason or "another rank was signalled"
