"""Which runs of a sweep train together as one stacked model, and each member's attempt around it.

Each member stays a normal run: its own run dir (.hydra/, run.yaml, status.yaml, attempts),
its own TensorBoard run with a single run's tags, its own diagnostics (fed `snapshot.member(i)`),
and its own checkpoints in a single run's format: the stacked trainer's checkpoint is cut into
one per member as it is written (`StackedCheckpointIO`), and glued back together on a resume.
A member that diverges is recorded and frozen; the others go on.

What may differ inside a group (everything else is the same computation): the seed, the init,
the optimizer's numbers (lr, momentum, weight decay, betas, eps) and the diagnostics' settings.
See `group_key`.
"""

import copy
import logging
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from actgrad import experiment
from actgrad.checkpoint import AlreadyCompleted, plan_start
from actgrad.checks import check_config, explain, first_line
from actgrad.data import available_memory
from actgrad.diagnostic import Diagnostic, overrides
from actgrad.grouping import OWN_CALLBACKS, few
from actgrad.rundir import Busy, RunDir, note_before_hydra
from actgrad.module import EVAL_CHUNK
from actgrad.stacked import Member, MemberLogs, StackedCheckpointIO, StackedData, StackedModule
from actgrad.stacking import NoStackedForm, member_state, stack
from actgrad.stop import StopRequest
from actgrad.writer import Writer

log = logging.getLogger(__name__)
ALONE = {"status": "alone"}  # train_group's answer for a run that cannot be stacked after all

# the hooks a member's callbacks may override: StackedModule.member_hooks calls them with the member's own module
MEMBER_HOOKS = ("setup", "on_train_start", "on_train_end", "on_exception", "state_dict", "load_state_dict")


def member_capable(callback) -> bool:
    """A diagnostic, or a callback of actgrad's own whose Lightning hooks a member's view can serve:
    any other would see the whole stack, so its run trains alone."""
    if isinstance(callback, Diagnostic) or type(callback).__module__.startswith(OWN_CALLBACKS):
        return all(name in MEMBER_HOOKS or not overrides(callback, name)
                   for name in dir(L.Callback) if name.startswith("on_") or name == "teardown")
    return False


def hydra_of(full: DictConfig) -> None:
    """Make a member's config the current Hydra config (the .hydra record, HPARAMS columns and stop file read it)."""
    if "hydra" in full:
        HydraConfig.instance().set_config(full)


def task_config(full: DictConfig) -> DictConfig:
    """The config without its `hydra` node, as Hydra hands it to train.py."""
    cfg = copy.deepcopy(full)
    with read_write(cfg), open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def prepare_member(full: DictConfig, run_dir: Path) -> Member | dict:
    """A member ready to stack, or the results of a run that will not train in this group."""
    hydra_of(full)
    cfg = task_config(full)
    note_before_hydra(run_dir)  # what a refusal may not remove
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    run = RunDir(run_dir)
    try:
        run.lock()
    except Busy as e:
        log.error("%s", e)
        run.log_attempt({"outcome": "busy", "error": str(e)})  # the sweep's summary counts it
        return {"status": "busy", "error": str(e)}
    try:
        check_config(cfg)
        data, module = experiment.build(cfg)  # as a single run builds it: same seed, same init
        made = module.configure_optimizers()  # its settings checked now, one line if bad
        module.record = experiment.run_record(cfg, data, module.net)
        start = plan_start(run.path, cfg, module.record, run.status(), run.read_yaml("run.yaml"))
        member = Member(cfg, full, run, module, start, data=data,
                        callbacks=[instantiate(c) for c in (cfg.callbacks or {}).values()],
                        best=instantiate(cfg.checkpoints.best, dirpath=str(run.path / "checkpoints")),
                        loggers=experiment.build_loggers(cfg, run, start))
    except AlreadyCompleted as done:
        run.unlock()
        run.log_attempt({"outcome": "already completed"})
        return done.status | {"skipped": True}
    except Exception as e:
        message = explain(e)
        if message is None:  # a programming error: its traceback in the log, this member alone fails
            log.exception("%s: failed", run.path)
            return failed(run, f"{type(e).__name__}: {first_line(e)}")
        return refused(Member(cfg, full, run, None, None), message)  # leaves only why, for the sweep's summary
    optimizer = made["optimizer"] if isinstance(made, dict) else made
    member.alone = why_alone(module.net, member.callbacks, data.block_size, optimizer)
    return member


def why_alone(net, callbacks, block_size: int, optimizer=None) -> str | None:
    """Why a member cannot train in a stack, in a few words; None when it can."""
    if optimizer is not None and not hasattr(optimizer, "member_index"):
        kind = type(optimizer)
        return (f"optimizer {kind.__module__}.{kind.__name__}: stacking needs actgrad's own optimizers "
                "(actgrad.optim: SGD, Adam, AdamW)")
    try:
        stack([net], block_size)  # the one place that decides, on a stack of one
    except NoStackedForm as e:
        return str(e)
    for c in callbacks:
        if not member_capable(c):
            return f"callback {type(c).__name__} overrides Lightning hooks a member's view cannot serve"
    return None


def say_alone(members: list[Member]) -> None:
    """Members that cannot stack, one line for those of one reason; each member's attempts record it.
    The launcher then trains each as a single run."""
    by_reason = {}
    for m in members:
        by_reason.setdefault(m.alone, []).append(m)
    for reason, alike in by_reason.items():
        log.warning("%s: trains alone: %s", " | ".join(m.run.path.name for m in alike), reason)
        for m in alike:
            m.run.log_attempt({"note": f"trains alone: {reason}"})
            m.run.unlock()


def train_group(cfgs: list[DictConfig], run_dirs: list[Path]) -> list[dict]:
    """Train runs that share one shape as one stacked model; each member's results, in order."""
    results, members = [None] * len(cfgs), []
    for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
        prepared = prepare_member(cfg, run_dir)
        if isinstance(prepared, dict):
            results[i] = prepared
        else:
            members.append((i, prepared))
    say_alone([m for _, m in members if m.alone])
    for i, m in members:
        if m.alone:
            results[i] = ALONE
    members = [(i, m) for i, m in members if not m.alone]
    by_step = {}
    for i, m in members:  # members resume together only from one step
        by_step.setdefault(m.start.step, []).append((i, m))
    for part in by_step.values():
        group = [m for _, m in part]
        message = too_big(group)
        outcomes = [refused(m, message) for m in group] if message else fit_group(group)
        for (i, _), r in zip(part, outcomes):
            results[i] = r
    return results


def memory_needed(members: list[Member]) -> int:
    """Bytes a stack of these members takes: per member its parameters (with gradients and up to two
    optimizer states) and one step's activations, training and evaluating (stacked.EVAL_CHUNK examples)."""
    net, cfg = members[0].module.net, members[0].cfg
    params = sum(p.numel() for p in net.parameters())
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]  # sizes from the module, not the config
    hidden = sum(layer.out_features for layer in linears[:-1])
    widths = linears[0].in_features + 4 * hidden + 3 * linears[-1].out_features  # floats per example
    per_member = 4 * (4 * params + (cfg.data.batch_size + EVAL_CHUNK // len(members)) * widths * 2)
    return per_member * len(members)


def too_big(members: list[Member]) -> str | None:
    """One line if the stack would not fit in the memory left (the device's, or the machine's)."""
    device = members[0].cfg.trainer.get("devices")
    if torch.cuda.is_available() and members[0].cfg.trainer.accelerator in ("gpu", "cuda", "auto"):
        index = device[0] if isinstance(device, (list, tuple)) or OmegaConf.is_list(device) else 0
        free = torch.cuda.mem_get_info(index)[0]
    else:
        free = available_memory()
    need = memory_needed(members)
    if free is None or need < 0.8 * free:
        return None
    return (f"a stack of {len(members)} runs needs about {need / 2**30:.1f} GB and {free / 2**30:.1f} GB is free: "
            f"lower hydra.launcher.stack_size (now at least {len(members)})")


def refused(m: Member, message: str) -> dict:
    log.error("%s: %s", m.run.path, message)
    experiment.refuse(m.run, message, record=True)
    return {"status": "failed", "error": message}


def failed(run: RunDir, error: str) -> dict:
    """A member that fails alone: its status and attempt say why; its files stay for debugging."""
    results = {"status": "failed", "error": error}
    run.write_status(results)
    run.log_attempt({"outcome": "failed", "error": error})
    run.unlock()
    return results


def fit_group(members: list[Member]) -> list[dict]:
    with MemberLogs(members) as logs:
        return fit_logged(members, logs)


def fit_logged(members: list[Member], logs: MemberLogs) -> list[dict]:
    first = members[0].cfg
    for m in members:
        m.writer = m.module.runs[0].writer = Writer(m.loggers)  # the loop's, and its callbacks' (Writer.of_run)
    module = StackedModule(members, stop=StopRequest(experiment.sweep_stop_file()), logs=logs)
    last = instantiate(first.checkpoints.last, dirpath=str(members[0].run.path / "checkpoints"))  # every member's
    bar = progress_bar(members)
    trainer = instantiate(first.trainer, logger=False, callbacks=[last] + ([bar] if bar else []),
                          plugins=[StackedCheckpointIO(module, last.path)], enable_progress_bar=bar is not None)
    for m in members:
        hydra_of(m.full)
        origin = experiment.begin(m.cfg, m.run, m.module, m.start, trainer.strategy.root_device, stacked=len(members))
        m.writer.text("provenance", experiment.markdown_table(origin), m.start.step)
    if first.threads:
        torch.set_num_threads(first.threads)
    cadences = tuple(sorted({first.log_every_n_steps, first.val_every_n_steps}
                            | {m.cfg.checkpoint_every_n_steps for m in members}))
    data = StackedData(members, first.steps_per_batch, first.trainer.max_steps, cadences)
    start = members[0].start
    names = [m.run.path.name for m in members]
    log.info("training %d runs stacked, %s steps on %s (%s)", len(members), first.trainer.max_steps,
             trainer.strategy.root_device, ", ".join(few(names)))
    status = experiment.fit_runs(trainer, module, data, start.ckpt_path, [m.run for m in members])
    trained = module.net.state_dict()  # each member's final weights; on a resume at max_steps, the checkpoint's
    out = []
    for j, m in enumerate(members):
        m.module.net.load_state_dict(member_state(trained, j))
        with logs.only(j):
            try:
                out.append(end_member(m, trainer, module, status))
            except Exception as e:  # one member's end (its files, its loggers) fails it alone
                log.exception("%s: its end failed", m.run.path)
                out.append(failed(m.run, f"{type(e).__name__}: {first_line(e)}"))
    module.stop.hand_over()  # under SLURM, preempted: submitit requeues the group (it resumes) and exits here
    return out


def progress_bar(members: list[Member]):
    """The group's one bar (the configured one, named after the group), or None when bars are off. Groups
    training at once each take a line of their own: the first member's job number modulo the launcher's n_jobs."""
    first = members[0]
    if not (first.cfg.trainer.enable_progress_bar and first.cfg.get("progress_bar")):
        return None
    n_jobs = OmegaConf.select(first.full, "hydra.launcher.n_jobs", default=None) or 1
    position = OmegaConf.select(first.full, "hydra.job.num", default=0) % max(1, int(n_jobs))
    return instantiate(first.cfg.progress_bar, description=f"{first.run.path.name} +{len(members) - 1} stacked", process_position=position)


def end_member(m: Member, trainer, module, status: dict) -> dict:
    """A member's end, as a single run's (experiment.conclude), with its own module and final weights."""
    hydra_of(m.full)
    results = dict(m.results or status)
    results["steps"] = results.get("steps", trainer.global_step)
    results = experiment.conclude(m.cfg, m.run, m.module, m.data, m.writer, results, m.start, module.stop,
                                  stacked=len(module.members))
    m.run.unlock()
    log.info("%s", experiment.end_line(m.run.path, results, m.loggers))
    return results
