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


def few(names: list[str], shown: int = 4) -> list[str]:
    """At most `shown` of a group's names in a line: the first ones, "...", the last."""
    return names if len(names) <= shown else [*names[: shown - 1], "...", names[-1]]


def group_key(cfg: DictConfig) -> str | None:
    """Runs with equal keys can train as one stacked model; None: this run trains alone (why_alone says why)."""
    if why_alone(cfg):
        return None
    flat = flatten(OmegaConf.to_container(cfg, resolve=False))
    return json.dumps({k: v for k, v in flat.items() if not role(k).may_differ_in_stack}, sort_keys=True, default=str)


def why_alone(cfg: DictConfig) -> str | None:
    """Why a run's config keeps it out of any stack, in a few words; None when it may stack (the worker
    checks its network and callbacks again: actgrad.group.why_alone)."""
    for key, why in (("ckpt_path", "it starts from a checkpoint of its own"), ("init_from", "it starts from another "
                     "run's weights"), ("compile", "torch.compile compiles one network")):
        if cfg.get(key):
            return f"{key}={cfg.get(key)}: {why}"
    if not cfg.get("optimizer"):
        return "no optimizer"
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in PLAIN_PRECISION:  # the single run takes Lightning's path, with its plugin: so must this
        return f"trainer.precision={precision}: a precision plugin scales the loss; stacking needs 32-bit"
    target = str(cfg.optimizer.get("_target_", ""))
    if not target.startswith("actgrad.optim."):
        return f"optimizer {target}: stacking needs actgrad's own optimizers (actgrad.optim: SGD, Adam, AdamW)"
    for c in (cfg.callbacks or {}).values():
        if not str(c.get("_target_", "")).startswith(OWN_CALLBACKS):
            return f"callback {c.get('_target_')}: a plain Lightning callback would see the whole stack"
    return None
