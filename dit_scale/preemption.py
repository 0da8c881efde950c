"""Preemption: SIGTERM / SIGUSR1 or `train.max_wall_minutes` → every rank saves at the same step and exits 75.

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
saves at step 1 and exits 75 instead of dying with 143.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_REQUEUE = 75    # EX_TEMPFAIL (sysexits.h): checkpoint saved, requeue with train.resume=auto
_early: list = []    # names of stop signals that arrived before the training loop's handlers


def catch_early_signals() -> None:
    """Remember SIGTERM / SIGUSR1 from now until the training loop installs its own handlers (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: _early.append(signal.Signals(signum).name))


class TrainingInterrupted(Exception):
    """SIGTERM / SIGUSR1 or train.max_wall_minutes: every rank saved a checkpoint at `step`; requeue to continue."""

    def __init__(self, step: int, reason: str, path: str = ""):
        super().__init__(f"{reason}: checkpoint saved at step {step}; requeue (train.resume=auto) to continue.")
        self.step, self.reason, self.path = step, reason, path


class Preemption:
    def __init__(self, max_wall_minutes: float = 0.0):
        self.limit = float(max_wall_minutes)
        self.t0 = time.monotonic()
        self.reason: Optional[str] = None       # set by a signal handler or the wall-time guard (a plain flag)
        self._previous = {}
        self._pending = None                    # (host copy, CUDA event) of the previous step's agreed vote

    def __enter__(self) -> "Preemption":
        """Install the handlers (main thread only: Python's rule)."""
        if threading.current_thread() is threading.main_thread():
            def on_signal(signum, frame):
                self.reason = signal.Signals(signum).name
            self._previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
        return self

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
