"""A sweep's start-up: its parent process imports neither torch nor Lightning (~4 s), and starts its
workers before it composes the jobs, so that their imports overlap that work."""

import datetime
import json
import re
import subprocess
import sys

from omegaconf import OmegaConf

from actgrad import gpus
from conftest import ROOT, TINY
from hydra_plugins.actgrad_launcher.stacked_launcher import jobs_in

# Runs train.py as `python train.py ARGS` would, in this process, and writes to REPORT: the stack of the
# first import of torch or Lightning (None if none), and when the first worker process started.
PARENT = """
import json, runpy, subprocess, sys, time, traceback

report, sys.argv = sys.argv[1], ["train.py", *sys.argv[2:]]
seen = {"import": None, "worker": None}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "lightning", "pytorch_lightning") and seen["import"] is None:
            seen["import"] = "".join(traceback.format_stack())
        return None

popen = subprocess.Popen.__init__
def started(self, *args, **kwargs):
    seen["worker"] = seen["worker"] or time.time()
    popen(self, *args, **kwargs)

sys.meta_path.insert(0, Watch())
subprocess.Popen.__init__ = started
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    with open(report, "w") as f:
        json.dump(seen, f)
"""


def test_a_sweeps_parent_imports_no_torch_and_starts_its_workers_before_composing_the_jobs(small_names, tmp_path):
    report = tmp_path / "parent.json"
    sweep = ["-m", "init=naive,kaiming", *TINY, "hydra.launcher.n_jobs=1", f"data.path={small_names}",
             f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run([sys.executable, "-c", PARENT, str(report), *sweep], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "2 completed" in said, said[-3000:]  # the workers trained the jobs
    seen = json.loads(report.read_text())
    assert seen["import"] is None, f"the sweep's parent imported torch or Lightning:\n{seen['import']}"
    # the launch line is logged once every job is composed (Hydra's time stamp: milliseconds, local time)
    stamp = re.search(r"^\[([\d\- :,]+)\]\[HYDRA\] Launching 2 jobs", said, re.M).group(1)
    launched = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert seen["worker"] is not None and seen["worker"] < launched


def test_a_sweep_starts_as_many_workers_as_its_jobs_need():
    def jobs(*task, params=None):
        cfg = OmegaConf.create({"hydra": {"overrides": {"task": list(task)}, "sweeper": {"params": params}}})
        return jobs_in(cfg, None)

    assert jobs("init=naive,scaled,kaiming", "norm=none,batchnorm", "seed=1") == 6
    assert jobs("seed=range(4)", params={"optimizer.lr": "0.1,0.2"}) == 8
    assert jobs("trainer.max_steps=10") == 1
    assert jobs("optimizer.lr=interval(0.01,1.0)") is None  # a search chooses its trials: unknown here


def test_the_gpus_a_sweeps_parent_counts_without_torch(monkeypatch, tmp_path):
    driver = tmp_path / "gpus"
    monkeypatch.setattr(gpus, "DRIVER", driver)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpus.visible_gpus() == 0  # no NVIDIA driver
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert gpus.visible_gpus() == 0  # the variable names GPUs the machine does not have
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (driver / bus).mkdir(parents=True)
    for visible, count in [(None, 3), ("0,2", 2), ("", 0), ("-1", 0), ("1,-1,2", 1), ("GPU-3f2a,GPU-77c1", 2),
                           ("0,1,2,3,4", 3)]:
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert gpus.visible_gpus() == count, visible
