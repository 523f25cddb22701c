"""The HPARAMS tab: one experiment for a sweep, whose columns are the choices a user made.

Columns are the config groups' choices (`init`, `norm`, `optimizer`, ...: Hydra's runtime
choices; a group set to null reads "none") and the values overridden on the command line
(`optimizer.lr`, `seed`, ...), for a sweep the union over all its jobs, so every run has every
column and TensorBoard, which shows one run's experiment definition for all, tells them apart.
Metrics are the lecture's numbers. Not the loggers' flattening of the whole config, which makes
a column of every `_target_`.
"""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from actgrad.keys import role
from actgrad.layers import watched

# How a run is watched, debugged or launched: not columns. TensorBoard shows the first five columns by name
# (what differs first, but it cannot tell from a written experiment), so every extra group hides one.
NOT_CHOICES = ("hydra/", "callbacks", "progress_bar", "search", "trainer", "logger", "debug")  # groups; keys: actgrad.keys
METRICS = ["init/loss", "init/uniform_loss", "final/train_loss", "final/val_loss", "final/test_loss", "final/steps",
           "final/diverged_step"]


def overridden_keys() -> list[str]:
    """The keys set on the command line: this run's, and in a sweep every job's (the sweep's command line)."""
    hydra = HydraConfig.get()
    lines = list(hydra.overrides.task)
    if hydra.mode.name == "MULTIRUN":  # only then: resolving sweep.dir (fresh_dir) would make its folder
        sweep_file = Path(hydra.sweep.dir) / "multirun.yaml"
        if sweep_file.is_file():
            lines += list(OmegaConf.load(sweep_file).hydra.overrides.task)
    keys = [o.get_key_element() for o in OverridesParser.create().parse_overrides(lines)]
    keys += list(hydra.sweeper.get("params") or {})  # a search (Optuna) declares what it varies
    return list(dict.fromkeys(k.lstrip("+~") for k in keys))


def columns(cfg: DictConfig) -> dict:
    """{column: value}: the group choices and the overridden settings of this run."""
    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    choices = {group: str(option).lower() if option is not None else "none"
               for group, option in hydra.runtime.choices.items() if not group.startswith(NOT_CHOICES)}
    values = {}  # what the command line set comes first: TensorBoard shows the first columns by default
    for key in overridden_keys():
        if key in choices:
            values[key] = choices[key]
        elif role(key).column:
            value = OmegaConf.select(cfg, key, default=None)
            values[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return values | choices


def metrics(cfg: DictConfig, net=None) -> list[str]:
    """The metric columns: the lecture's numbers, and each watched layer's final saturation (the layers
    `net` calls, found by one probe that changes nothing: actgrad.layers.watched). Without `net`, the
    MLP's n_layers, for a caller not yet passing it."""
    if net is not None:
        layers = list(watched(net, cfg.data.block_size, quiet=True).paths)
    else:
        layers = [f"layer{i}" for i in range(1, OmegaConf.select(cfg, "model.n_layers", default=0) + 1)]
    return METRICS + [f"final/saturation/{name}" for name in layers]
