"""The run-safety wrapper of a training invocation: one process per run folder (the lock), SIGINT and
SIGTERM as a clean stop at a step boundary, and every way a run stops as one line naming where to go on.
Kept out of moekd.py so the training loop reads as the method; it calls in at three points.
"""
from __future__ import annotations

import errno
import signal
import sys
import threading
import time
from pathlib import Path

from checkpoints import RunLock, latest_checkpoint, stop_message
from errors import MoekdError, RunInterrupted, RunStopped
from parallel import SINGLE, Dist, all_reduce_sum

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 1.0  # a second signal within this is the same request (torchrun forwards a terminal's Ctrl-C)


class StopSignals:
    """SIGINT/SIGTERM while training: finish the optimizer step, checkpoint, exit 128 + signal. Why: a
    Ctrl-C or a scheduler's SIGTERM should lose no work. Before training starts, and for a second
    signal, the stop is at once (nothing to save then; the user insisting)."""

    def __init__(self, out: Path, dist: Dist = SINGLE):
        self.out, self.dist = out, dist
        self.signum: int | None = None  # the first signal received
        self.at = 0.0
        self.deferred = False           # True inside the training loop: stop at the next step boundary
        self.step = 0                   # the last finished step (for the messages)
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum: int, frame) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.signum is None and self.deferred:
            self.signum, self.at = signum, now
            if self.dist.main:
                print(f"{name}: finishing step {self.step + 1}, then a checkpoint and stop (a second signal "
                      f"stops at once)", file=sys.stderr, flush=True)
            return
        if self.signum is not None and now - self.at < REPEAT_S:
            return
        raise RunInterrupted(self.at_once(signum), signum, quiet=not self.dist.main)

    def at_once(self, signum: int) -> str:
        name = signal.Signals(signum).name
        if not self.deferred:
            return f"stopped ({name}) before training started; nothing was trained"
        try:
            ckpt = latest_checkpoint(self.out)
        except MoekdError:
            ckpt = None
        where = f"its last checkpoint is {ckpt}, continue with --resume" if ckpt else \
            "no checkpoint was saved"
        return f"stopped at once ({name}, a second signal) in step {self.step + 1}; {where}"

    def agreed(self) -> int:
        """The signal every rank stops for (0: none), at a step boundary: an all-reduced flag, so all
        ranks take the same branch and none waits forever at the checkpoint barrier."""
        if self.dist.world == 1:
            return self.signum or 0
        counts = all_reduce_sum([float(self.signum == s) for s in SIGNALS], self.dist)
        return next((int(s) for s, c in zip(SIGNALS, counts) if c > 0), 0)

    def stopped(self, signum: int, step: int, total: int) -> RunInterrupted:
        """What a run stopped by `signum` at `step` raises once its checkpoint is written."""
        name = signal.Signals(signum).name
        return RunInterrupted(f"stopped at step {step} ({name}); continue with --resume", signum,
                              quiet=not self.dist.main)


class RunGuard:
    """Around one invocation of moekd.main: the lock (rank 0), the signal handlers, and the one-line
    message of a run that stops on a full disk, a read-only disk or non-finite numbers."""

    def __init__(self, out: Path, dist: Dist = SINGLE):
        self.out = out
        self.lock = RunLock(active=dist.main)
        self.signals = StopSignals(out, dist)

    def __enter__(self) -> "RunGuard":
        self.signals.__enter__()
        return self

    def __exit__(self, kind, e, tb) -> bool:
        self.signals.__exit__()
        self.lock.release()
        if isinstance(e, RunStopped) or isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS):
            raise MoekdError(stop_message(e, self.out)) from None
        return False
