"""From a composed Hydra config to a trained, logged run: `train(cfg, run_dir)`, plain and testable.

An attempt at a run goes: take the run dir's lock; check the settings, the data and what the
dir already holds (same run? completed?) without writing anything; then train, resuming from
the run's last checkpoint if it has one; then write the status. An attempt that is refused
removes only what it created itself.
"""

import inspect
import logging
import math
import os
import platform
import pydoc
import shutil
import shlex
import signal
import subprocess
import warnings
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torch.utils.tensorboard.writer import FileWriter

from actgrad import events, hparams, sweep  # noqa: F401  (sweep registers the resolvers conf/config.yaml uses)
from actgrad.checks import ConfigError, check_config, explain, first_line
from actgrad.checkpoint import AlreadyCompleted, AtomicCheckpointIO, check_shapes, config_hash, plan_start, run_config
from actgrad.data import CENSUS
from actgrad.layers import probe
from actgrad.model import has_shift
from actgrad.module import Diverged, LanguageModel, sweep_dir
from actgrad.rundir import Busy, RunDir, fault
from actgrad.stop import StopRequest, stop_file
from actgrad.writer import Writer

log = logging.getLogger(__name__)

# Lightning's start-up chatter (device lines, a sales tip) and two warnings that do not apply:
# we log at our own cadence, and the pytree deprecation is Lightning's own business.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")  # we save after steps, on purpose
warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # a resumed run's checkpoints dir
# Two notes on every resume that ask nothing of the user: a stacked group's loader has no state for Lightning
# to save and needs none (a step's batch depends on the step alone, data.RandomBatches); and TensorBoard's
# reader (events.scalars) reports the purge from the resumed step that build_loggers asks for.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended "
                                          "and your dataloader is not resumable")
logging.getLogger("tensorboard").addFilter(
    lambda record: not record.getMessage().startswith("Detected out of order event.step"))

DIVERGED_AT = 1e4  # x ln(V): a finite loss this far above the uniform baseline counts as diverged


def build(cfg: DictConfig):
    """The data module and the LightningModule a config describes, seeded and initialised."""
    L.seed_everything(cfg.seed, verbose=False)
    data = instantiate(cfg.data)
    data.prepare()
    net = build_net(cfg, data.vocab_size, data.block_size)
    check_output(net, cfg.model._target_, data.vocab_size, data.block_size)
    init = instantiate(cfg.init)
    named, any_keyword = parameter_names(init)  # actgrad's rules find roles (embedding, hidden, output) by call order
    init(net, **({"block_size": data.block_size} if "block_size" in named or any_keyword else {}))
    if cfg.compile:
        net.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
    module = LanguageModel(
        net,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        log_every_n_steps=cfg.log_every_n_steps,
        val_every_n_steps=cfg.val_every_n_steps,
        config=OmegaConf.to_container(cfg, resolve=True),
        diverge_above=DIVERGED_AT * math.log(data.vocab_size),
        vocab=data.vocab,
    )
    return data, module


def build_net(cfg: DictConfig, vocab_size: int, block_size: int) -> torch.nn.Module:
    """The network of cfg.model, given vocab_size and block_size only if its constructor names them (or takes
    **kwargs), and the norm group's layer only if it names `norm`: nothing it did not ask for. A norm its
    model does not take is refused in one line, so no record shows a norm the model did not use."""
    target = cfg.model._target_
    found = pydoc.locate(target)
    if found is None:
        raise ConfigError(f"model._target_={target}: cannot import it; give a class (or function) importable "
                          "from here, e.g. model._target_=mypkg.Net with mypkg on PYTHONPATH")
    named, any_keyword = parameter_names(found)
    args = {k: v for k, v in {"vocab_size": vocab_size, "block_size": block_size}.items() if k in named or any_keyword}
    if cfg.get("norm"):
        if "norm" not in named:  # **kwargs would swallow it unused
            raise ConfigError(f"norm={norm_name(cfg)}: {target} takes no `norm` argument, so the norm group does not "
                              "apply to it; give norm=none (model=custom does by default)")
        args["norm"] = instantiate(cfg.norm)
    return instantiate(cfg.model, **args)


def parameter_names(target) -> tuple[set, bool]:
    """(the argument names a class or function takes, whether it takes **kwargs); (set(), False) when
    Python cannot tell (some built-ins): then it is given nothing but its config."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return set(), False
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in parameters)


def norm_name(cfg: DictConfig) -> str:
    """The norm as the user chose it: its option (batchnorm) under Hydra, else its target."""
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get("norm"))
    return str(cfg.norm.get("_target_", cfg.norm))


def check_output(net: torch.nn.Module, target: str, vocab_size: int, block_size: int) -> None:
    """The contract (README, "Bring your own model"): (batch, block_size) int64 indices in, (batch, vocab)
    float logits out. Refused in one line before training. The probe pass changes no random stream and no
    buffer (layers.probe), so a run with this check logs what a run without it logs."""
    out, _ = probe(net, block_size)
    batch, name = 2, f"model._target_={target}"
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        got = f"a {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{name}: returns {got}; expected float logits of shape (batch, vocab)")
    got = tuple(out.shape)
    if got == (batch, block_size, vocab_size):
        raise ConfigError(f"{name}: returns logits for every position, (batch, block_size, vocab) = {got}; actgrad "
                          "trains on the next character after each window only: return (batch, vocab), e.g. logits[:, -1]")
    if got != (batch, vocab_size):
        raise ConfigError(f"{name}: returns logits of shape {got} for a (batch, block_size) = {(batch, block_size)} "
                          f"input; expected (batch, vocab) = {(batch, vocab_size)}")


def prepare(cfg: DictConfig, run: RunDir, extra_callbacks=()):
    """Everything that can refuse the attempt, before anything is written: (data, module, start, trainer)."""
    check_config(cfg)
    data, module = build(cfg)
    module.configure_optimizers()  # built here, not first in fit: its settings are refused before anything is written
    module.record = run_record(cfg, data, module.net)
    start = plan_start(run.path, cfg, module.record, run.status(), run.read_yaml("run.yaml"))
    if start.init_weights is not None:
        check_shapes(start.init_weights, module, cfg.init_from)
        module.load_state_dict(start.init_weights)
    return data, module, start, build_trainer(cfg, run, build_loggers(cfg, run, start), extra_callbacks)


def run_record(cfg: DictConfig, data, net=None) -> dict:
    """What defines the run (its config, the data's sha256 for its path) and its hash, and the shapes of its
    parameters: in run.yaml and checkpoints. The shapes are not hashed: a model's code can change them
    under the same config, and a resume then is refused naming the parameter (checkpoint.check_same_shapes)."""
    config = run_config(cfg, data.describe()["sha256"])
    record = {"config_hash": config_hash(config), "run_config": config}
    if net is not None:
        record["shapes"] = shapes(net)
    return record


def shapes(net: torch.nn.Module) -> dict:
    """{parameter name: its shape as a list}: what run.yaml records of the network."""
    return {name: list(p.shape) for name, p in net.named_parameters()}


def build_trainer(cfg: DictConfig, run: RunDir, loggers: list, extra_callbacks=()) -> L.Trainer:
    """Lightning's Trainer with the diagnostics, the checkpoints and the loggers; nothing is written yet.
    Settings Lightning rejects (trainer=gpu without a GPU) are refused in one line."""
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    callbacks += [instantiate(c, dirpath=str(run.path / "checkpoints")) for c in cfg.checkpoints.values()]
    if cfg.trainer.enable_progress_bar and cfg.get("progress_bar"):
        callbacks.append(instantiate(cfg.progress_bar, **bar_place(run)))
    callbacks.extend(extra_callbacks)
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # preemption is ours to handle (stop.py): Lightning's requeue would save
        plugins.append(SLURMEnvironment(auto_requeue=False))  # mid-chunk into the working dir
    try:
        return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                           plugins=[*instantiate(cfg.trainer.get("plugins") or []), *plugins])
    except InstantiationException as e:
        if isinstance(e.__cause__, MisconfigurationException):
            device = f"accelerator={cfg.trainer.get('accelerator')}, devices={cfg.trainer.get('devices')}"
            raise ConfigError(f"trainer ({device}): {first_line(e.__cause__)}") from None
        raise


def bar_place(run: RunDir) -> dict:
    """A sweep's job draws its bar under its own name, on a line of its own among the jobs training at
    once (its job number modulo the launcher's n_jobs), as a stacked group's bar does (actgrad.group)."""
    if sweep_dir() is None:
        return {}
    hydra_cfg = HydraConfig.get()
    n_jobs = OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=None) or 1
    return {"description": run.path.name, "process_position": hydra_cfg.job.num % max(1, int(n_jobs))}


def build_loggers(cfg: DictConfig, run: RunDir, start) -> list:
    """The loggers of conf/logger/, writing into the run dir: a `save_dir` or `purge_step` left null is
    filled in here. A logger whose package is missing is refused in one line with its install command."""
    filled = {"save_dir": str(run.path),
              # TensorBoard (and its EventAccumulator) drop what an earlier attempt logged from this step on;
              # what was logged at this very step before the checkpoint is written again (module.py)
              "purge_step": start.step if run.has_events() else None}
    loggers = []
    for name, c in (cfg.get("logger") or {}).items():
        if c is None:
            continue
        try:
            loggers.append(instantiate(c, **{k: v for k, v in filled.items() if k in c and c[k] is None}))
        except Exception as e:
            cause = e.__cause__ or e  # Hydra wraps what the constructor raised
            if isinstance(cause, (ModuleNotFoundError, ImportError)):  # Lightning's message names the pip command
                raise ConfigError(f"logger={name}: {first_line(cause)}") from None
            raise
    return loggers


def train(cfg: DictConfig, run_dir: str | Path, extra_callbacks=(), record_refusal: bool = False) -> dict:
    """Train one run into run_dir and return its final losses and status.

    Bad settings or data, a busy run dir or a run dir holding another run raise ConfigError
    with a one-line message; the attempt then leaves nothing of its own behind (in a sweep,
    `record_refusal`, it leaves its status for the sweep's summary). A run that diverges,
    crashes or is stopped by a signal returns status 'diverged', 'failed' or 'interrupted',
    recorded in run_dir/status.yaml and in TensorBoard.
    """
    stop_file = sweep_stop_file()
    if stop_file and os.path.exists(stop_file):  # the sweep was interrupted before this job began
        log.warning("%s: not started, the sweep is stopping", run_dir)
        results = {"status": "interrupted", "steps": 0, "signal": "SIGTERM", "error": "not started"}
        RunDir(run_dir).log_attempt({"outcome": "interrupted", **results})  # the sweep's summary counts it
        return results
    run = RunDir(run_dir)
    try:
        run.lock()
    except Busy as e:
        if record_refusal:  # touch nothing of the other attempt's but its log, where the summary counts this job
            run.log_attempt({"outcome": "busy", "error": str(e)})
        raise ConfigError(str(e)) from None
    try:
        data, module, start, trainer = prepare(cfg, run, extra_callbacks)
    except AlreadyCompleted as done:
        run.unlock()
        run.log_attempt({"outcome": "already completed"})
        log.info("%s: already completed at step %s; nothing to do (give another hydra.run.dir to train again)",
                 run.path, done.status.get("steps"))
        return done.status | {"skipped": True}
    except Exception as e:
        message = explain(e)
        if message is None:  # a programming error: keep its traceback, and the dir for debugging
            run.unlock()
            raise
        refuse(run, message, record_refusal)
        raise ConfigError(message) from e
    try:
        results = fit(cfg, run, data, module, start, trainer)
    finally:
        run.unlock()
    if not cfg.get("keep_run", True) and results["status"] == "completed":  # debug=fdr: every code path ran
        for name in set(os.listdir(run.path)) - run.names_before:  # folders this attempt made: checkpoints/, .hydra/
            if (run.path / name).is_dir() and not (run.path / name).is_symlink():
                shutil.rmtree(run.path / name)
        run.discard()  # then its files, and the dirs it made: nothing of anyone else's
        log.info("run completed at step %s; removed what it wrote (keep_run=false)", results["steps"])
    else:
        log.info("%s", end_line(run.path, results, trainer.loggers))
    return results


def refuse(run: RunDir, message: str, record: bool) -> None:
    run.discard()
    if record:  # a sweep's job: the summary reads why; a run already there keeps its own status
        run.path.mkdir(parents=True, exist_ok=True)  # discard removed it if this attempt made it and it was empty
        if run.status() is None:
            run.write_status({"status": "failed", "error": message})
        run.log_attempt({"outcome": "failed", "error": message})


def save_hydra_record(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra's .hydra/ record (config, hydra, overrides), written once the attempt is accepted:
    Hydra itself would write it before we could refuse (conf/config.yaml sets output_subdir null)."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = run_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


def sweep_stop_file() -> str | None:
    """In a sweep, the file whose existence asks every job to stop (see actgrad.stop)."""
    sweep = sweep_dir()
    return str(stop_file(sweep)) if sweep is not None else None


def begin(cfg, run: RunDir, module, start, device, **extra) -> dict:
    """An accepted attempt's first writes: run.yaml, .hydra/, status `training`, provenance; its provenance."""
    if not (run.path / "run.yaml").is_file():
        run.write_yaml("run.yaml", module.record)
    save_hydra_record(cfg, run.path)
    for torn in run.path.glob("checkpoints/.*.ckpt.*.partial"):  # AtomicCheckpointIO's, of an attempt killed mid-write
        torn.unlink()
    run.write_status({"status": "training", "pid": os.getpid(), "from_step": start.step, **extra})
    origin = provenance(device)
    run.write_yaml("provenance.yaml", origin)  # this attempt's; every attempt's commit is in attempts.jsonl
    run.log_attempt({"outcome": "started", "from_step": start.step, "commit": origin["git"]["commit"],
                     "dirty": origin["git"]["dirty"], **extra})
    log.info("%s", parameter_line(run.path.name, module.net))
    return origin


def parameter_line(name: str, net) -> str:
    """The run's parameter count; with a norm's shift after a Linear, the lecture's count too: it keeps that
    Linear's bias, which the shift makes redundant (12,297 for its final model, 12,097 here)."""
    count = sum(p.numel() for p in net.parameters())
    dropped = sum(b.linear.out_features for b in getattr(net, "blocks", [])
                  if hasattr(b, "norm") and has_shift(b.norm) and b.linear.bias is None)
    return f"{name}: {count:,} parameters" + (
        f" (the lecture's layout keeps a bias before each norm's shift: {count + dropped:,})" if dropped else "")


def fit(cfg, run: RunDir, data, module, start, trainer) -> dict:
    origin = begin(cfg, run, module, start, trainer.strategy.root_device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data.steps_per_batch, data.max_steps, data.seed = cfg.steps_per_batch, cfg.trainer.max_steps, cfg.seed
    data.cadences = (cfg.log_every_n_steps, cfg.val_every_n_steps, cfg.checkpoint_every_n_steps)
    Writer.of(trainer).text("provenance", markdown_table(origin), start.step)
    module.stop = StopRequest(sweep_stop_file())
    if start.ckpt_path:
        log.info("resuming from %s (step %d)", start.ckpt_path, start.step)
    log.info("training %s steps on %s into %s", cfg.trainer.max_steps, trainer.strategy.root_device, run.path)

    results = fit_runs(trainer, module, data, start.ckpt_path, [run])
    results = conclude(cfg, run, module, data, module.writer, results, start, module.stop, signal=results.get("signal"))
    module.stop.hand_over()  # under SLURM, preempted: submitit requeues the job and exits here
    return results


def fit_runs(trainer, module, data, ckpt_path, runs: list[RunDir]) -> dict:
    """trainer.fit of a run or a stack of runs (their RunDirs), and how it ended: {"status": completed, diverged
    (every run has; each run's own results are in module.runs) or failed, "error", "steps"}. A second Ctrl-C
    stops at once: every run's status says so, then SystemExit."""
    results, failure = {"status": "completed"}, None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except Diverged as e:  # a result, not a crash (said when found): the sweep goes on and reports it
        results, failure = {"status": "diverged", "error": str(e)}, e
    except (KeyboardInterrupt, SystemExit) as e:  # a second Ctrl-C (Lightning turns it into SystemExit)
        module.after_exception(e)
        for run in runs:
            run.write_status({"status": "interrupted", "steps": trainer.global_step, "signal": "SIGINT",
                              "error": "stopped at once by a second Ctrl-C; resumes from the last checkpoint"})
            run.log_attempt({"outcome": "interrupted", "steps": trainer.global_step, "signal": "SIGINT"})
            run.unlock()
        raise SystemExit(128 + signal.SIGINT) from None
    except OSError as e:  # a full disk, a file-size limit, a vanished directory: say it in one line
        log.error("run failed: %s", e)
        results, failure = {"status": "failed", "error": f"{type(e).__name__}: {e}"}, e
    except Exception as e:  # one crashed job must not take a sweep down: record it, say it, move on
        log.exception("run failed")
        results, failure = {"status": "failed", "error": f"{type(e).__name__}: {e}"}, e
    if failure is not None:
        module.after_exception(failure)
    results["steps"] = trainer.global_step
    if not module.started and results["status"] == "completed":  # resumed at max_steps, killed during its end:
        for j in range(len(module.runs)):  # Lightning skipped the loop and its hooks; what the purge removed
            module.write_again(j)  # is written again,
        module.end_again()  # and the diagnostics' end (figures, calibration) is done again
    return results


def conclude(cfg, run: RunDir, module, data, writer: Writer, results: dict, start, stop, **attempt) -> dict:
    """A run's end after training, alone or in a stack (`module` is its own, with its final weights; `writer`
    what it wrote with): its final losses and last words in every logger, its status, its attempt."""
    loggers = writer.loggers
    if stop.signum is not None and results["status"] == "completed" and results["steps"] < cfg.trainer.max_steps:
        results = {"status": "interrupted", "steps": results["steps"], "signal": signal.Signals(stop.signum).name}
    fault("after_training")
    board = next((lg for lg in loggers if isinstance(lg, TensorBoardLogger)), None)
    end(cfg, loggers, module, data, results, board if start.step else None, latest=writer.latest)
    fault("run_end")
    run.write_status(results)
    fault("status")
    run.log_attempt({"outcome": results["status"], "steps": results["steps"], "error": results.get("error"),
                     **{k: v for k, v in attempt.items() if v is not None}})
    return results


def end(cfg, loggers: list, module, data, results: dict, board=None, latest: dict | None = None) -> None:
    """A run's end: the final losses of a completed run (finish), then every logger's (write_end). An
    exception there fails the run, in results (the status written next), in one line: a run whose end
    could not be written must not stay `training`, nor read as completed."""
    try:
        if results["status"] == "completed":
            finish(cfg, loggers, module, data, results)
        if results["status"] != "failed" or not results["error"].startswith("OSError"):
            write_end(loggers, board, cfg, results, latest=latest, net=module.net, data=data)  # a disk that failed once is not written to again
    except Exception as e:
        log.exception("could not write the run's end")
        results.update(status="failed", error=f"writing the run's end: {type(e).__name__}: {first_line(e)}")


def finish(cfg, loggers: list, module, data, results) -> None:
    """The final losses on every split, written at the final step."""
    losses = {split: module.evaluate(*data.splits[split]) for split in ("train", "val", "test")}
    end = {"test/loss": losses["test"]}
    if results["steps"] % cfg.val_every_n_steps:  # the loop validated at every multiple already
        end["val/loss"] = losses["val"]
    try:
        Writer(loggers).scalars(end, results["steps"])
    except OSError as e:
        results.update(status="failed", error=f"{type(e).__name__}: {e}")
        return
    results.update({f"final/{split}_loss": float(loss) for split, loss in losses.items()})


def final_values(board, results: dict, latest: dict | None = None) -> dict:
    """final/* at the final step: the losses, the step, the diverged step, each layer's last saturation
    (from the TensorBoard logger `board`'s events, which hold earlier attempts' too, given for a resumed
    attempt; else from `latest`, what this attempt wrote: reading a long run's events back takes ~0.1-0.5 s)."""
    step = results["steps"]
    finals = {k: v for k, v in results.items() if k.startswith("final/")} | {"final/steps": step}
    if results["status"] == "diverged":
        finals["final/diverged_step"] = step
    if board is not None:
        board.experiment.flush()
        # a tag can be empty: a resume at the step where all its points were logged purged them all
        latest = {tag: points[-1][1] for tag, points in events.scalars(board.log_dir).items() if points}
    for tag, value in (latest or {}).items():
        if tag.startswith("act/saturation/"):
            finals[f"final/saturation/{tag.rsplit('/', 1)[-1]}"] = value
    return finals


def write_end(loggers: list, board, cfg, results: dict, latest: dict | None = None, net=None, data=None) -> None:
    """The run's end in every logger: final values at the final step, the hyperparameters, the status.
    An interrupted run writes only its status: the attempt that resumes it purges from this step.
    `board`, `latest`: where the final saturations come from (final_values)."""
    step, writer = results["steps"], Writer(loggers)
    try:
        if results["status"] != "interrupted":
            writer.scalars(final_values(board, results, latest), step)
            columns = (hparams.columns(cfg) or {"seed": cfg.seed}) | {"status": results["status"]}  # no Hydra: no choices
            words = getattr(data, "words", None)
            if words is not None and words.name == CENSUS:  # offline: not the data its choice names
                columns["data"] = f"{columns.get('data', 'names')} (offline: {CENSUS})"
            for logger in loggers:
                if not isinstance(logger, TensorBoardLogger):
                    logger.log_hyperparams(columns)
                    continue
                save_hparams_to_yaml(Path(logger.log_dir) / "hparams.yaml", columns)  # Lightning's is {}: we bypass it
                # torch's summary.hparams, written into the run's own dir: Lightning's log_hyperparams would
                # also write the metrics at step 0, and SummaryWriter.add_hparams into a new run of its own
                hparams_file = FileWriter(logger.log_dir)
                for summary in hparams_summary(columns, dict.fromkeys(hparams.metrics(cfg, net), 0.0)):
                    hparams_file.add_summary(summary, step)
                hparams_file.close()
        writer.text("status", yaml.safe_dump(results, sort_keys=False), step)
        for logger in loggers:  # Lightning's words: MLflow marks its run FINISHED or FAILED by them
            logger.finalize("success" if results["status"] == "completed" else "failed")
            if isinstance(logger, WandbLogger):  # else the next run of this process (a sweep's worker) would reuse it
                logger.experiment.finish(exit_code=0 if results["status"] == "completed" else 1)
    except OSError as e:
        log.error("could not write the run's end to its loggers: %s", e)


def printable_path(path: Path) -> str:
    """A path as one would type it into a shell here: relative to the working directory when inside it,
    quoted when it needs it (`callbacks=[default,grad_norm]` is a glob to zsh)."""
    relative = os.path.relpath(path)
    return shlex.quote(path.as_posix() if relative.startswith("..") else relative)


def format_value(value) -> str:
    """A float as a loss reads: 2.0712, and 3.8e+31 or nan rather than 32 digits; anything else as it is."""
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def end_line(path: Path, results: dict, loggers) -> str:
    """The end of a run in two lines: where it wrote, its status and losses; how to look at it."""
    losses = ", ".join(f"{k.removeprefix('final/').removesuffix('_loss')} {format_value(v)}"
                       for k, v in results.items() if k.startswith("final/"))
    line = f"run {printable_path(path)}: {results['status']} at step {results.get('steps', 0):,}" + (f"; loss {losses}" if losses else "")
    if results.get("error") and results["status"] != "diverged":  # a diverged run's error was said when it happened
        line += f" ({results['error']})"
    look = [f"tensorboard --logdir {printable_path(path)}, then {sweep.BOARD_URL} ({sweep.BOARD_NOTE})"
            for lg in loggers if isinstance(lg, TensorBoardLogger)][:1]
    look += [printable_path(Path(lg.log_dir) / "metrics.csv") for lg in loggers if isinstance(lg, CSVLogger)]
    return line + ("\nlook at it: " + "; ".join(look) if look else "")


def provenance(device) -> dict:
    """What produced the run: actgrad's git commit (and whether the tree had uncommitted changes) when it
    runs from a checkout, the versions of what it runs on, and the device."""
    source = Path(__file__).resolve().parent

    def git(*args):
        try:
            done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    versions = {"python": platform.python_version()}
    for package in ("actgrad", "torch", "lightning", "hydra-core", "omegaconf", "tensorboard"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"git": {"commit": commit, "dirty": dirty}, "versions": versions,
            "device": {"type": str(device), "name": name, "cpus": os.cpu_count()}, "host": platform.node()}


def markdown_table(record: dict) -> str:
    """A nested record as a two-column markdown table: TensorBoard's TEXT tab renders it."""
    rows = [(f"{group}.{key}", value) for group, values in record.items()
            for key, value in (values.items() if isinstance(values, dict) else [("", values)])]
    return "| | |\n|---|---|\n" + "\n".join(f"| {key.rstrip('.')} | {value} |" for key, value in rows)
