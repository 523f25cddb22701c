"""Train one run, or a sweep with -m. Examples:

    python train.py
    python train.py -m init=naive,scaled,kaiming norm=none,batchnorm
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from actgrad.experiment import remove_run_dir, train

log = logging.getLogger("actgrad")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        return train(cfg, run_dir)
    except ValueError as e:  # bad settings or data, found before training started
        remove_run_dir(run_dir)
        log.error("%s", e)
        if HydraConfig.get().mode == RunMode.RUN:
            sys.exit(1)
        return {"status": "failed", "error": str(e)}


if __name__ == "__main__":
    main()
