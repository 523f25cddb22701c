"""A stacked sweep's worker process: `python -m hydra_plugins.actgrad_launcher.worker PREFIX PARENT`.

Each group trains in a process of its own, started by the launcher, so that a worker that dies
(the OOM killer, kill -9) takes only its own group's members. The launcher starts it before it has
composed the jobs: the worker imports what training needs (torch, Lightning: most of a run's
start-up) meanwhile, then waits for the end of its standard input. By then PREFIX.task holds its
group's job (cloudpickled: Hydra's task function may live in the user's `__main__`), or there is no
such file and it exits; PREFIX.result receives its JobReturns. The worker stops like a run does
when its parent dies: it asks itself to stop at the next step boundary (SIGTERM), saves and exits,
so no orphan trains on.
"""

import gc
import os
import signal
import sys
import threading
import time

import cloudpickle


def stop_when_orphaned(parent: int, every: float = 1.0) -> None:
    """A daemon thread that, once the parent has died, sends this process SIGTERM every `every` seconds:
    the first one that arrives while a group trains stops it at the next step boundary."""

    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        while True:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(every)

    threading.Thread(target=watch, daemon=True, name="orphan-watch").start()


def defer_signals() -> None:
    """Outside training (preparing, writing a run's end) a signal must not cut a status write in half:
    it is noted and acted on at the next step boundary or start (actgrad.stop installs its own handlers
    while a group trains, and puts these back after)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, frame: None)


def main(prefix: str, parent: int) -> None:
    stop_when_orphaned(parent)
    defer_signals()
    import actgrad.experiment  # noqa: F401  (torch, Lightning: imported while the launcher composes the jobs)

    sys.stdin.buffer.read()  # the launcher ends it once the task is written, or when it has none for us (or died)
    if not os.path.exists(f"{prefix}.task"):
        return
    with open(f"{prefix}.task", "rb") as f:
        function, args = cloudpickle.load(f)
    returns = function(*args)
    with open(f"{prefix}.result.partial", "wb") as f:
        cloudpickle.dump(returns, f)
    os.replace(f"{prefix}.result.partial", f"{prefix}.result")  # the launcher reads a whole result or none
    gc.freeze()  # exit at once: collecting torch's and Lightning's objects one by one at exit takes ~1 s


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
