"""Stopping cleanly: SIGTERM (schedulers) and Ctrl-C ask a run to stop at the next step boundary,
where it saves last.ckpt and writes its status; a second Ctrl-C stops at once.

A sweep's parent process cannot reach into its jobs, so when it is interrupted it creates a
stop file in the sweep dir that every job checks at its step boundaries. The file is named after
the sweep's invocation (`ACTGRAD_SWEEP`, set by the parent and inherited by its workers), so one
left behind by a sweep that was killed never stops a later one.

Under SLURM with submitit (hydra/launcher=slurm), the preemption signal (submitit's USR2) stops
the run the same way, saving into the run dir; then submitit's own handler, which was there
before ours, requeues the job, whose next attempt resumes from that checkpoint.
"""

import logging
import os
import signal
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SWEEP_ID = "ACTGRAD_SWEEP"  # environment variable: this sweep invocation's id, set by its parent process


def stop_file(sweep_dir) -> Path:
    """The file whose existence asks every job of this sweep invocation to stop as if sent SIGTERM."""
    return Path(sweep_dir) / f".stop-{os.environ.get(SWEEP_ID, 'sweep')}"


def preemption_signal():
    """The signal SLURM sends a submitit job before preempting it (submitit's setting; USR2 by default)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


class StopRequest:
    def __init__(self, stop_file=None):
        self.stop_file = stop_file
        self.signum = None
        self.said = False  # the stop said in the log, once, at the step boundary that acts on it
        self.previous = {}
        self.requeue = None  # submitit's handler of the preemption signal, called once we have saved

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (a launcher running jobs in threads)
        for signum in {signal.SIGINT, signal.SIGTERM, preemption_signal()} - {None}:
            self.previous[signum] = signal.signal(signum, self.handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.signum is not None and self.signum == preemption_signal() and callable(self.previous.get(self.signum)):
            self.requeue = self.previous[self.signum]
        self.previous = {}

    def hand_over(self) -> None:
        """After the run has saved and written its status: let submitit requeue the job (it then exits)."""
        if self.requeue is not None:
            log.warning("preempted: handing over to submitit to requeue this job")
            self.requeue(self.signum, None)

    def handle(self, signum, frame) -> None:
        # No logging here: a second Ctrl-C's KeyboardInterrupt could cut this handler's log call while it
        # holds the log handler's lock, and the interrupted run's own last lines would then wait forever
        if self.signum is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third must not cut the interrupted status short
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, whatever is half done
        if self.signum is not None:
            return  # noted already (an orphaned worker repeats its SIGTERM)
        self.signum = signum
        if self.stop_file is not None:  # in a sweep: the jobs after this one do not start
            open(self.stop_file, "a").close()

    def requested(self) -> bool:
        """Checked at step boundaries: a signal arrived, or the sweep's stop file exists (said once)."""
        if self.signum is None and self.stop_file is not None and os.path.exists(self.stop_file):
            self.signum = signal.SIGTERM
        if self.signum is not None and not self.said:
            self.said = True
            log.warning("%s: stopping at this step boundary to save a checkpoint (Ctrl-C again to stop at once)",
                        signal.Signals(self.signum).name)
        return self.signum is not None
