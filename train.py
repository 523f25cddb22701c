"""Train one run, or a sweep with -m. Examples:

    python train.py
    python train.py -m init=naive,scaled,kaiming norm=none,batchnorm
"""

import contextlib
import gc
import logging
import shlex
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from actgrad.checks import ConfigError, check_writable, one_line_errors, release_errors
from actgrad.gpus import gpu_count, take_gpu

log = logging.getLogger("actgrad")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    release_errors()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    # imported here, not above: a sweep's parent process never trains, and Lightning takes ~4 s to import
    from actgrad.experiment import train

    # a sweep's job trains on a free GPU from the sweep's pool, held until train() returns
    on_gpu = sweeping and cfg.trainer.accelerator in ("auto", "gpu", "cuda") and gpu_count() > 0  # not trainer=cpu, mps
    gpu_slot = take_gpu(hydra_cfg.sweep.dir, gpu_count(), cfg.jobs_per_gpu) if on_gpu else contextlib.nullcontext()
    try:
        with gpu_slot as gpu:
            if gpu is not None:
                with open_dict(cfg):
                    cfg.trainer.accelerator, cfg.trainer.devices = "gpu", [gpu]
            results = train(cfg, run_dir, record_refusal=sweeping)
    except ConfigError as e:  # bad settings or data, or a run dir that is not this run's: nothing was trained
        if not sweeping:
            sys.exit(f"error: {e}")
        log.error("%s", e)
        results = {"status": "failed", "error": str(e)}  # the sweep's summary lists it
    if results["status"] == "interrupted" and not sweeping:
        print(f"interrupted at step {results['steps']:,} ({results['signal']}); last.ckpt saved. "
              f"Resume with: {resume_command(run_dir)}", file=sys.stderr)
        sys.exit(128 + signal.Signals[results["signal"]].value)  # 130 for Ctrl-C, 143 for SIGTERM
    if results["status"] == "failed" and not sweeping:
        sys.exit(1)
    if cfg.objective:  # a search minimises this; a run that diverged or failed is the worst trial
        return results.get(cfg.objective, float("inf"))
    return results


def resume_command(run_dir: Path) -> str:
    """The command line that resumes this run: the same overrides, the same run dir."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.run.dir=")]
    return shlex.join(["python", sys.argv[0], *overrides, f"hydra.run.dir={run_dir}"])


if __name__ == "__main__":
    try:
        check_writable(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    try:
        with one_line_errors(sys.argv[1:], Path(__file__).parent / "conf"):
            main()
    except KeyboardInterrupt:  # a sweep's second Ctrl-C: its jobs have recorded `interrupted`
        print("stopped at once by a second Ctrl-C; the same command resumes from the last checkpoints", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        gc.freeze()  # exit at once: collecting torch's and Lightning's objects one by one at exit takes ~1 s
