"""Train one run, or a sweep with -m. Examples:

    python train.py
    python train.py -m init=naive,scaled,kaiming norm=none,batchnorm
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from actgrad.experiment import ConfigError, check_choices, remove_run_dir, train

log = logging.getLogger("actgrad")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        return train(cfg, run_dir)
    except ConfigError as e:
        remove_run_dir(run_dir)  # bad settings or data: nothing was trained, nothing is kept
        log.error("%s", e)
        if HydraConfig.get().mode == RunMode.RUN:
            sys.exit(1)
        return {"status": "failed", "error": str(e)}


if __name__ == "__main__":
    try:
        check_choices(sys.argv[1:], Path(__file__).parent / "conf")
    except ConfigError as e:
        sys.exit(f"error: {e}")
    main()
