"""Train one run, or a sweep with -m. Examples:

    python train.py
    python train.py -m init=naive,scaled,kaiming norm=none,batchnorm
"""

import logging
import sys
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from actgrad.checks import ConfigError, check_choices, check_writable, remove_run_dir
from actgrad.sweep import assign_gpu, gpu_count

log = logging.getLogger("actgrad")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    gpu = assign_gpu(hydra_cfg.job.num, gpu_count(), cfg.jobs_per_gpu) if sweeping else None
    if gpu is not None:
        with open_dict(cfg):
            cfg.trainer.accelerator, cfg.trainer.devices = "gpu", [gpu]
    # imported here, not above: a sweep's parent process never trains, and Lightning takes ~4 s to import
    from actgrad.experiment import train

    try:
        results = train(cfg, run_dir)
    except ConfigError as e:  # bad settings or data: nothing was trained
        log.error("%s", e)
        remove_run_dir(run_dir)
        if not sweeping:
            sys.exit(1)
        results = {"status": "failed", "error": str(e)}  # the sweep's summary and report list it
        run_dir.mkdir(parents=True)
        (run_dir / "status.yaml").write_text(yaml.safe_dump(results, sort_keys=False))
    if results["status"] == "failed" and not sweeping:
        sys.exit(1)
    if cfg.objective:  # a search minimises this; a run that diverged or failed is the worst trial
        return results.get(cfg.objective, float("inf"))
    return results


if __name__ == "__main__":
    try:
        check_choices(sys.argv[1:], Path(__file__).parent / "conf")
        check_writable(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    main()
