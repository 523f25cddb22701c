"""Run directory names a person tells apart at a glance in TensorBoard.

In a sweep, `${swept:}` names each job by the overrides that vary across the sweep, in
command-line order (`init=kaiming,norm=batchnorm`), leaving out the ones every job shares
(`trainer.max_steps=...`). Without a sweep list it falls back to Hydra's override_dirname.
"""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf


def swept_overrides() -> str:
    hydra = HydraConfig.get()
    fallback = hydra.job.override_dirname or "run"
    sweep_file = Path(hydra.sweep.dir) / "multirun.yaml"  # the sweep's command line, saved by the sweeper
    if not sweep_file.is_file():
        return fallback
    parser = OverridesParser.create()
    sweep = parser.parse_overrides(list(OmegaConf.load(sweep_file).hydra.overrides.task))
    varying = [o.get_key_element() for o in sweep if o.is_sweep_override()]
    job = {o.get_key_element(): line for o, line in
           zip(parser.parse_overrides(list(hydra.overrides.task)), hydra.overrides.task)}
    name = ",".join(job[key] for key in varying if key in job).replace("/", "_")
    return name or fallback


if not OmegaConf.has_resolver("swept"):
    OmegaConf.register_new_resolver("swept", swept_overrides)
