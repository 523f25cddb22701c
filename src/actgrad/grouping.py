"""Which runs of a sweep can train together as one stacked model: read from their configs alone,
without importing torch (the sweep's parent process decides the groups and trains nothing).

Runs share a group when they differ only in keys that may differ within a stack (actgrad.keys:
the seed, the init, the optimizer's numbers, the diagnostics' settings, the checkpoint cadence, threads). A callback
outside actgrad's own packages (`callbacks.`, `actgrad.`) trains alone at once; the worker that
trains a group checks each callback's class again (actgrad.group.member_capable).
"""

import json

from omegaconf import DictConfig, OmegaConf

from actgrad.keys import PLAIN_PRECISION, flatten, role

OWN_CALLBACKS = ("actgrad.",)  # written for a member's view of the trainer (see actgrad.stacked)


def group_key(cfg: DictConfig) -> str | None:
    """Runs with equal keys can train as one stacked model; None: this run trains alone."""
    if cfg.get("ckpt_path") or cfg.get("init_from") or cfg.get("compile") or not cfg.get("optimizer"):
        return None
    if str(cfg.trainer.get("precision", "32-true")) not in PLAIN_PRECISION:
        return None  # a precision plugin scales the loss: the single run takes Lightning's path, so must this
    if not str(cfg.optimizer.get("_target_", "")).startswith("actgrad.optim."):
        return None  # the stacked update needs actgrad.optim's flat buffers
    if not all(str(c.get("_target_", "")).startswith(OWN_CALLBACKS) for c in (cfg.callbacks or {}).values()):
        return None  # a plain Lightning callback would see the whole stack
    flat = flatten(OmegaConf.to_container(cfg, resolve=False))
    return json.dumps({k: v for k, v in flat.items() if not role(k).may_differ_in_stack}, sort_keys=True, default=str)
