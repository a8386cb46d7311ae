"""Stop signals: the first SIGTERM/SIGINT after a step asks the loop to checkpoint at the end of the step and exit
128 + signal (SLURM's preemption and time limit, torchrun's shutdown, Ctrl-C).

Before the first step of this process has finished, or on a second request, the process exits at once: there is
no new step to save, or the user asked twice. The loop reads :attr:`StopRequest.signal` into the step's one
all-reduce, so a signal on any rank stops every rank at the same step.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Any, Callable, Dict, Optional

log = logging.getLogger("medst_fast")

# A stop signal repeated within this many seconds is the same request delivered twice, not a second one: torchrun
# passes the SIGTERM its own process group received on to each rank's group, and SLURM signals every process of
# the job, so a rank may get one preemption twice within milliseconds.
SAME_SIGNAL_S = 2.0


class StopRequest:
    """The handlers for SIGTERM/SIGINT while the loop runs; ``signal`` is the first one received (or None).

    ``progress()`` returns (steps this process finished, the checkpoint it resumed from, the last checkpoint),
    for the exit-at-once messages.
    """

    def __init__(self, progress: Callable[[], tuple]):
        self.progress = progress
        self.signal: Optional[int] = None
        self._time = 0.0  # time.monotonic() of the first stop signal
        self._old: Dict[int, Any] = {}

    def on_signal(self, signum, frame) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.signal is not None and now - self._time < SAME_SIGNAL_S:
            return
        steps_run, resumed_from, last_ckpt = self.progress()
        if self.signal is not None:
            why = (f"received {name} again while stopping: exiting now without waiting for the checkpoint of this "
                   f"step; the last complete checkpoint is {last_ckpt}")
        elif steps_run == 0:
            since = f"the checkpoint {resumed_from} it resumed from" if resumed_from else "no checkpoint"
            why = (f"received {name} before the first step of this process finished (data loading or a first "
                   f"--compile): exiting now; no step was taken since {since}, so there is nothing new to save")
        else:
            self.signal, self._time = signum, now
            log.warning("received %s: saving a checkpoint at the end of this step, then exiting", name)
            return
        log.warning("%s", why)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def install(self) -> None:
        # Installed when the loop starts, not while the run is built: until then SIGTERM keeps its default and
        # ends the process at once (nothing to save yet).
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self.on_signal)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
                pass

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
