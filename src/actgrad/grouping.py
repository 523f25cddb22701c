"""Which runs of a sweep can train together as one stacked model: read from their configs alone,
without importing torch (the sweep's parent process decides the groups and trains nothing).

Runs share a group when everything but these may differ: the seed, the init, the optimizer's
numbers (MEMBER_NUMBERS), the diagnostics' settings, the checkpoint cadence, threads. A callback
outside actgrad's own packages (`callbacks.`, `actgrad.`) trains alone at once; the worker that
trains a group checks each callback's class again (actgrad.group.member_capable).
"""

from omegaconf import DictConfig, OmegaConf

MEMBER_NUMBERS = ("lr", "momentum", "dampening", "weight_decay", "betas", "eps")  # a member's own, as tensors
FREE_KEYS = ("seed", "init", "callbacks", "hydra", "checkpoint_every_n_steps", "threads", "jobs_per_gpu")
OWN_CALLBACKS = ("callbacks.", "actgrad.")  # written for a member's view of the trainer (see actgrad.stacked)
PLAIN_PRECISION = ("32-true", "32", "64-true", "64")


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
    shared = OmegaConf.to_container(cfg, resolve=False)
    for key in FREE_KEYS:
        shared.pop(key, None)
    shared["optimizer"] = {k: v for k, v in shared["optimizer"].items() if k not in MEMBER_NUMBERS}
    shared["trainer"] = {k: v for k, v in shared["trainer"].items() if k != "enable_progress_bar"}
    return OmegaConf.to_yaml(OmegaConf.create(shared))
