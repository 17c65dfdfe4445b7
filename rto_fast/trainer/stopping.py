"""Stopping a run on request without losing what it trained: SIGTERM (a scheduler's preemption notice, `kill`) or
Ctrl-C makes the running stage finish its current step, save a checkpoint and exit; the same command resumes there.

    with StopSignals():                    # train.run: installed for the whole run (main thread only)
        ...
        # a training loop, after each optimizer step (RL: each iteration): the periodic checkpoint, and on a stop
        # request a checkpoint of this step (if not just written) and StopRequested
        checkpoint_or_stop(step, last, checkpoint_every, save_checkpoint, dist, stage)

The handler only records the signal, so a step is never cut in half; a second Ctrl-C interrupts at once (no
checkpoint) for when waiting for the step is not wanted. In a data-parallel run the ranks agree (the largest
signal number over ranks) so that every rank saves the same step: one small all-reduce per step.
"""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # signal numbers received while StopSignals is active


class StopRequested(Exception):
    """A stage stopped on a signal after saving a checkpoint at `step`; the process should exit with `exit_code`
    (128 + the signal number, what a shell reports for a process the signal ended)."""

    def __init__(self, signal_number: int, stage: str, step: int | None):
        self.signal_number, self.stage, self.step = signal_number, stage, step
        self.exit_code = 128 + signal_number
        name = signal.Signals(signal_number).name
        if step is None:  # between stages
            message = f"stopped by {name} before stage {stage} (the stages before it finished)"
        else:
            message = f"stopped by {name} after step {step} of stage {stage}; a checkpoint of that step was saved"
        super().__init__(f"{message}: run the same command to resume")


def _record(signal_number, frame) -> None:
    if signal_number == signal.SIGINT and signal.SIGINT in _received:
        raise KeyboardInterrupt  # the second Ctrl-C: stop now
    _received.append(signal_number)
    logger.warning("%s received: finishing the current step, then saving a checkpoint and stopping (Ctrl-C again to "
                   "stop at once)", signal.Signals(signal_number).name)


class StopSignals:
    """Context manager: SIGTERM and SIGINT are recorded (see `stop_requested`) instead of ending the process; the
    previous handlers come back on exit. Outside the main thread (where Python cannot set handlers) it does
    nothing."""

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            _received.clear()
            for signal_number in STOP_SIGNALS:
                self.previous[signal_number] = signal.signal(signal_number, _record)
        return self

    def __exit__(self, *exc):
        for signal_number, handler in self.previous.items():
            signal.signal(signal_number, handler)
        _received.clear()
        return False


def stop_requested(dist=None) -> int:
    """The signal number a stop was requested with (0: none), agreed over the ranks of a data-parallel run."""
    requested = max(_received, default=0)
    if dist is not None and dist.parallel:
        requested = dist.max(requested)
    return requested


def checkpoint_or_stop(step: int, last: bool, checkpoint_every: int, save_checkpoint, dist, stage: str) -> None:
    """End of a training loop's step: save a checkpoint when it is the last step or a multiple of `checkpoint_every`;
    when a stop was requested (and more steps remain), save one if not just saved and raise StopRequested."""
    saved = last or bool(checkpoint_every and step % checkpoint_every == 0)
    if saved:
        save_checkpoint(step)
    signal_number = stop_requested(dist)
    if signal_number and not last:
        if not saved:
            save_checkpoint(step)
        raise StopRequested(signal_number, stage, step)
