"""From a composed Hydra config to a trained, logged run: `train(cfg)`, plain and testable."""

import logging
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from actgrad import sweep  # noqa: F401  (registers the resolvers conf/config.yaml uses)
from actgrad.checks import ConfigError, check_config, explain
from actgrad.checkpoint import AtomicCheckpointIO, check_compatible, resume_path
from actgrad.diagnostic import write_scalars
from actgrad.module import Diverged, LanguageModel

log = logging.getLogger(__name__)

# Lightning's start-up chatter (device lines, a sales tip) and two warnings that do not apply:
# we log at our own cadence, and the pytree deprecation is Lightning's own business.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def build(cfg: DictConfig):
    """The data module and the LightningModule a config describes, seeded and initialised."""
    L.seed_everything(cfg.seed, verbose=False)
    data = instantiate(cfg.data)
    data.prepare()
    norm = instantiate(cfg.norm) if cfg.norm else None
    net = instantiate(cfg.model, vocab_size=data.vocab_size, block_size=data.block_size, norm=norm)
    instantiate(cfg.init)(net)
    if cfg.compile:
        net.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
    module = LanguageModel(
        net,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        log_every_n_steps=cfg.log_every_n_steps,
        lean_optimizer=cfg.lean_optimizer,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return data, module


def flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def train(cfg: DictConfig, run_dir: str | Path, extra_callbacks=()) -> dict:
    """Train one run into run_dir and return its final losses and status.

    Bad settings or data raise ConfigError, with a one-line message, before anything is
    written. A run that diverges or crashes returns status 'diverged' or 'failed' (with the
    error), recorded in run_dir/status.yaml and in TensorBoard (TEXT and the HPARAMS status).
    """
    run_dir = Path(run_dir)
    try:
        check_config(cfg)
        data, module = build(cfg)
        callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
        callbacks += [instantiate(c, dirpath=str(run_dir / "checkpoints")) for c in cfg.checkpoints.values()]
        callbacks.extend(extra_callbacks)
        trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                              val_check_interval=cfg.val_every_n_steps // cfg.steps_per_batch)
        ckpt_path = resume_path(cfg.ckpt_path, run_dir)
        resume_step = check_compatible(ckpt_path, module) if ckpt_path else 0
    except Exception as e:
        message = explain(e)
        if message is None:
            raise
        raise ConfigError(message) from e
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data.steps_per_batch, data.max_steps, data.seed = cfg.steps_per_batch, cfg.trainer.max_steps, cfg.seed
    # purge_step: TensorBoard hides what a killed attempt logged after the checkpoint we resume from
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False,
                               purge_step=resume_step + 1 if resume_step else None)
    trainer.loggers = [logger]
    if ckpt_path:
        log.info("resuming from %s (step %d)", ckpt_path, resume_step)

    log.info("training %s steps on %s into %s", cfg.trainer.max_steps, trainer.strategy.root_device, run_dir)
    results = {"status": "completed"}
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except Diverged as e:  # a result, not a crash: the sweep goes on and reports it
        log.error("%s", e)
        results = {"status": "diverged", "error": str(e)}
    except Exception as e:  # one crashed job must not take a sweep down: record it, say it, move on
        log.exception("run failed")
        results = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    results["steps"] = trainer.global_step
    if results["status"] == "completed":
        losses = {split: module.evaluate(*data.splits[split]) for split in ("train", "val", "test")}
        end = {"test/loss": losses["test"]}
        if trainer.global_step % cfg.val_every_n_steps:  # the loop validated at every multiple already
            end["val/loss"] = losses["val"]
        write_scalars(trainer, end, trainer.global_step)
        results.update({f"final/{split}_loss": float(loss) for split, loss in losses.items()})

    hparams = flat(OmegaConf.to_container(cfg, resolve=True)) | flat(data.describe(), "dataset.")
    hparams["status"] = results["status"]
    logger.log_hyperparams(hparams, metrics={"final/steps": results["steps"]} | {
        k: v for k, v in results.items() if k.startswith("final/")})
    logger.experiment.add_text("status", yaml.safe_dump(results, sort_keys=False), results["steps"])
    logger.finalize(results["status"])
    (run_dir / "status.yaml").write_text(yaml.safe_dump(results, sort_keys=False))
    log.info("%s", ", ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in results.items()))
    return results
