"""Bad settings, caught before anything is built or written: each a one-line ConfigError.

Nothing here imports torch or Lightning, so train.py can check its command line, and a
sweep's parent process can launch its jobs, without the ~4 s that importing them takes.
"""

import contextlib
import difflib
import io
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_loader import ConfigLoader
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from hydra.errors import InstantiationException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from actgrad.rundir import MADE_BY_RESOLVER, missing_dirs


class ConfigError(ValueError):
    """A setting we cannot run with; the message names it and says what is accepted."""


# Trainer settings actgrad decides itself, each with the setting to use instead: a Trainer(...) value
# would be overwritten by actgrad.experiment or mean nothing to its loop. Any other trainer.* is Lightning's.
ACTGRAD_SETS = {
    "log_every_n_steps": "log_every_n_steps={steps}",
    "val_check_interval": "val_every_n_steps={steps}",
    "check_val_every_n_epoch": "val_every_n_steps=<steps>",
    "logger": "logger=<tensorboard, csv, wandb, mlflow>, or logger=[tensorboard,csv] for several",
    "callbacks": "callbacks=<option> for diagnostics, +callbacks.<name>._target_=<your.Callback> for your own",
    "enable_checkpointing": "checkpoint_every_n_steps=<steps>, or ~checkpoints.best",
    "default_root_dir": "hydra.run.dir=<dir>",
    "fast_dev_run": "debug=fdr",
    "overfit_batches": "debug=overfit (data.train_examples=<n>: every step draws its own batch, so Lightning's repeats none)",
}
# Trainer settings actgrad's loop cannot honour: {key: (the values that are fine, why not others)}
MANUAL = "actgrad steps the optimizer itself (Lightning's manual optimization), which Lightning neither clips nor accumulates for"
UNSUPPORTED = {
    "gradient_clip_val": ((None, 0), MANUAL),  # Lightning would refuse them once fit has started
    "accumulate_grad_batches": ((None, 1), MANUAL),
}


def trainer_refusal(key: str, value: Any) -> str | None:
    """Why trainer.<key>=<value> cannot be used, in one line, or None when Lightning takes it as it is."""
    line = f"trainer.{key}={show(value)}"
    if key in ACTGRAD_SETS and not (key == "check_val_every_n_epoch" and value is None):  # conf/trainer's own value
        steps = value if isinstance(value, int) and not isinstance(value, bool) else "<steps>"
        return f"{line}: actgrad sets it; use {ACTGRAD_SETS[key].format(steps=steps)}"
    if key in UNSUPPORTED and value not in UNSUPPORTED[key][0]:
        return f"{line}: not supported; {UNSUPPORTED[key][1]}"
    return None


def check_config(cfg: DictConfig) -> None:
    """Catch bad values before anything is built or written."""
    for key in cfg.trainer:
        refusal = trainer_refusal(str(key), cfg.trainer[key])
        if refusal:
            raise ConfigError(refusal)
    positive = {
        "optimizer.lr": cfg.optimizer.get("lr"),
        "trainer.max_steps": cfg.trainer.max_steps,
        "steps_per_batch": cfg.steps_per_batch,
        "log_every_n_steps": cfg.log_every_n_steps,
        "val_every_n_steps": cfg.val_every_n_steps,
        "checkpoint_every_n_steps": cfg.checkpoint_every_n_steps,
    }
    for key, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: must be a number > 0")
    if OmegaConf.is_missing(cfg.model, "_target_"):  # conf/model/custom.yaml's ???
        raise ConfigError("model._target_: not set; model=custom trains your own nn.Module: "
                          "model._target_=mypkg.Net (README, 'Bring your own model')")
    check_counts(cfg)
    for name, callback in (cfg.get("callbacks") or {}).items():
        target = str((callback or {}).get("_target_", ""))
        if target.startswith("callbacks."):  # the folder installs as actgrad.callbacks: two import paths, two states
            raise ConfigError(f"callbacks.{name}._target_={target}: the diagnostics are the package actgrad.callbacks; "
                              f"use _target_=actgrad.{target}")


# Whole numbers accepted only in a range: (least, most or None, what is accepted)
COUNTS = {
    "seed": (0, 2**32 - 1, "from 0 to 4294967295"),  # what Lightning's seed_everything takes (numpy's seeds)
    "threads": (0, None, ">= 0 (torch threads per run; 0 leaves torch's default)"),
    "jobs_per_gpu": (1, None, ">= 1 (jobs sharing one GPU in a sweep)"),
}


def check_counts(cfg: DictConfig) -> None:
    """The seed, threads and jobs_per_gpu: checked in each run, and before a sweep launches anything
    (a bad jobs_per_gpu or threads would fail every job, or leave the launcher nothing to run)."""
    for key, (least, most, accepted) in COUNTS.items():
        value = cfg[key]
        if not whole(value) or value < least or (most is not None and value > most):
            raise ConfigError(f"{key}={show(value)}: must be a whole number {accepted}")


def whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Hydra's command-line flags. Its parser (hydra/_internal/utils.py) is not public, hence this list.
PLAIN_FLAGS = {"-m", "--multirun", "-r", "--run", "--resolve"}
VALUE_FLAGS = {"-c", "--cfg", "-p", "--package"}
INFO_FLAGS = {"-i", "--info"}  # an optional topic follows
INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
MODE_FLAGS = {"-r": "run", "--run": "run", "-m": "multirun", "--multirun": "multirun", "-c": "cfg", "--cfg": "cfg",
              "-i": "info", "--info": "info"}  # one at a time
# Defaults of one type among several their target takes: Lightning's devices is 1, [0, 1] or "auto".
ANY_TYPE = {"trainer.devices"}


class HeldErrors(io.StringIO):
    """Standard error held while Hydra composes the config (see one_line_errors)."""

    def __init__(self, real):
        super().__init__()
        self.real = real


def release_errors() -> None:
    """Hydra has handed over a config: what it wrote to standard error goes out, and from now on at once."""
    held = sys.stderr
    if isinstance(held, HeldErrors):
        sys.stderr = held.real
        sys.stderr.write(held.getvalue())


@contextlib.contextmanager
def one_line_errors(args: list[str], conf_dir: Path):
    """Hydra's own errors (an unknown option, a key that does not exist, an override it cannot parse) run to
    a dozen lines: hold standard error until Hydra hands over a config (the task function, or a launcher,
    calls release_errors); if Hydra stops before that, say what is wrong in one line (check_overrides),
    else pass on what Hydra wrote. Nothing is checked before Hydra starts: a launch pays for this only
    when it fails."""
    sys.stderr = held = HeldErrors(sys.stderr)
    sweep_dir = next((Path(a.partition("=")[2]) for a in args if a.startswith("hydra.sweep.dir=")), None)
    new_dirs = missing_dirs(sweep_dir) if sweep_dir else []
    had_record = sweep_dir is not None and (sweep_dir / "multirun.yaml").exists()
    try:
        yield
    except SystemExit as stop:
        if sys.stderr is held and stop.code not in (0, None):
            sys.stderr = held.real
            if not had_record:  # Hydra's sweeper records the sweep before it composes the jobs: not a sweep now
                for folder in (MADE_BY_RESOLVER or new_dirs)[:1] + ([sweep_dir] if sweep_dir else []):
                    (folder / "multirun.yaml").unlink(missing_ok=True)
                remove_empty(new_dirs + MADE_BY_RESOLVER)
            try:
                check_overrides(args, conf_dir)
            except ConfigError as e:
                raise SystemExit(f"error: {e}") from None
        raise
    finally:
        release_errors()


def remove_empty(folders: list[Path]) -> None:
    """The folders this process made, deepest first, where nothing was put in them."""
    for folder in sorted(set(folders), key=lambda f: len(f.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_overrides(args: list[str], conf_dir: Path) -> None:
    """Name a bad override and what is accepted, in one line, where Hydra would print a dozen.

    Hydra itself parses the overrides and composes the config, so what Hydra accepts passes. A sweep
    (-m) is composed once for each value of each swept key, the other keys at their first value.
    """
    split = split_args(args)
    if not split or not split[0]:
        return  # no overrides; or another config, a rerun, help, a flag we do not know: left to Hydra
    overrides, multirun = split
    with initialize_config_dir(config_dir=str(Path(conf_dir).absolute()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)
        parsed = [parse(parser, arg) for arg in overrides]
        for o in parsed:
            key = o.key_or_group.removeprefix("trainer.")
            if o.key_or_group.startswith("trainer.") and "." not in key and o.type != OverrideType.DEL:
                values = list(o.sweep_iterator()) if o.is_discrete_sweep() else [o.value()]
                refusal = next(filter(None, (trainer_refusal(key, v) for v in values)), None)
                if refusal:
                    raise ConfigError(refusal)
        multirun = multirun or any(o.key_or_group == "hydra.mode" and o.value() == "MULTIRUN" for o in parsed)
        lines = [sweep_lines(o, multirun) for o in parsed]
        left_to_sweeper = [o for o, values in zip(parsed, lines) if not values]
        composer = Composer(loader)
        for n, job in enumerate(jobs([values for values in lines if values])):
            composer.check([parse(parser, line) for line in job], keys_only=left_to_sweeper if n == 0 else [])


def split_args(args: list[str]) -> tuple[list[str], bool] | None:
    """(overrides, multirun), or None when a flag hands the whole command line to Hydra."""
    modes = {MODE_FLAGS[a.partition("=")[0]]: a for a in args if a.partition("=")[0] in MODE_FLAGS}
    if len(modes) > 1:  # Hydra would stop with a traceback
        raise ConfigError(f"{' and '.join(modes.values())}: give only one of --run, --multirun, --cfg, --info")
    overrides, multirun, i = [], False, 0
    while i < len(args):
        arg = args[i]
        flag, eq, _ = arg.partition("=")
        if not arg.startswith("-"):
            overrides.append(arg)
        elif flag in PLAIN_FLAGS:
            multirun = multirun or flag in ("-m", "--multirun")
        elif flag in VALUE_FLAGS:
            i += not eq  # --cfg job: job is the flag's, not an override
        elif flag in INFO_FLAGS:
            i += not eq and i + 1 < len(args) and args[i + 1] in INFO_TOPICS
        else:
            return None  # --config-name, --config-dir, --experimental-rerun, --help, a typo...
        i += 1
    return overrides, multirun


def parse(parser: OverridesParser, arg: str) -> Override:
    try:
        return parser.parse_overrides([arg])[0]
    except OverrideParseException as e:
        raise ConfigError(f"{arg}: cannot parse: {parse_error(arg, e.message)}") from None


def parse_error(arg: str, message: str) -> str:
    """The reason in Hydra's parse error: its lines are a header, the reason (or the input with a caret
    under the bad character), and a link."""
    lines = message.splitlines()
    for line, caret in zip(lines, lines[1:]):
        if line.startswith("LexerNoViableAltException: "):
            at = caret.find("^") - len("LexerNoViableAltException: ")
            return f"unexpected {arg[at]!r} at character {at + 1}" if 0 <= at < len(arg) else "unexpected character"
    noise = ("Error parsing override", "See http")
    reasons = [line.strip() for line in lines if line.strip() and not line.startswith(noise)]
    return "; ".join(reasons) or "expected key=value"


def sweep_lines(override: Override, multirun: bool) -> list[str]:
    """The overrides a sweep stands for, one per value; [] for one left to the sweeper (Optuna's interval)."""
    if not override.is_sweep_override():
        return [override.input_line]
    if not multirun:
        hint = "; a list is written [a,b]" if override.value_type == ValueType.SIMPLE_CHOICE_SWEEP else ""
        raise ConfigError(f"{override.input_line}: a sweep needs -m (--multirun){hint}")
    if override.is_interval_sweep():
        return []
    return [f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()]


def jobs(values: list[list[str]]) -> list[list[str]]:
    """Jobs in which each value of each key appears at least once: not the whole grid, which grows as a product."""
    first = [v[0] for v in values]
    return [first] + [first[:i] + [other] + first[i + 1 :] for i, v in enumerate(values) for other in v[1:]]


class Composer:
    """Checks each job's overrides against the config Hydra composes for them (the defaults of its
    settings composed once for all jobs that choose the same options)."""

    def __init__(self, loader: ConfigLoader):
        self.loader = loader
        self.bases = {}  # configs composed without a job's settings, by their overrides

    def check(self, job: list[Override], keys_only: list[Override]) -> None:
        """Options of groups, then settings: the key exists and the value has its default's type."""
        options = {o.key_or_group: self.loader.get_group_options(o.key_or_group) for o in job + keys_only}
        # a setting changes a value; a dict given to a group (init={gain:2}) is merged into its config
        settings = [o for o in job if o.type == OverrideType.CHANGE
                    and (not options[o.key_or_group] or isinstance(o.value(), dict))]
        choices = [o for o in job if options[o.key_or_group] and o not in settings
                   and o.type in (OverrideType.CHANGE, OverrideType.ADD)]  # ~group, ++group: Hydra's to judge
        for o in choices:
            check_choice(o, options[o.key_or_group])
        defaults = self.compose_base([o.input_line for o in job if o not in settings])
        for o in settings:
            check_setting(o, defaults)
        for o in keys_only:
            if not options[o.key_or_group]:
                find(o, defaults)
        if settings:
            composed = compose_config([o.input_line for o in job])
            check_launcher(composed)
            check_counts(composed)

    def compose_base(self, lines: list[str]) -> dict:
        if tuple(lines) not in self.bases:
            # unresolved: resolving runs resolvers, and fresh_dir creates the run's directory
            self.bases[tuple(lines)] = OmegaConf.to_container(compose_config(lines), resolve=False)
        return self.bases[tuple(lines)]


def check_launcher(cfg: DictConfig) -> None:
    """What Hydra would only report from inside the launcher, as a traceback-like block."""
    size = OmegaConf.select(cfg, "hydra.launcher.stack_size", default=None)
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ConfigError(f"hydra.launcher.stack_size={size!r}: must be a whole number >= 1 (runs in one stacked model)")
    launcher = OmegaConf.select(cfg, "hydra.launcher", default=None)
    if launcher is not None:
        check_jobs(OmegaConf.to_container(launcher, resolve=False), stacked=size is not None)


def check_jobs(launcher: dict, stacked: bool) -> None:
    """hydra.launcher.n_jobs when given as a number: with 0 jobs at once the stacked launcher would wait forever
    (and joblib refuses 0); joblib's launcher (hydra/launcher=parallel) also takes -1 for one job per CPU."""
    jobs = launcher.get("n_jobs")
    if jobs is None or (isinstance(jobs, str) and "${" in jobs):
        return  # ${parallel_jobs:${threads},${jobs_per_gpu}}: at least 1, from the threads and jobs_per_gpu checked
    if not whole(jobs) or jobs == 0 or (stacked and jobs < 0):
        joblib = "" if stacked else ", or -1 for one per CPU (joblib's)"
        raise ConfigError(f"hydra.launcher.n_jobs={show(jobs)}: must be a whole number >= 1 (jobs at once){joblib}")


def compose_config(lines: list[str]) -> DictConfig:
    try:
        return compose(config_name="config", overrides=lines, return_hydra_config=True)
    except Exception as e:  # Hydra's, OmegaConf's, or a ValueError (norm=null)
        raise ConfigError(first_line(e) + plugin_hint(str(e))) from None


# Hydra plugins that actgrad's configs name, and the extra of pyproject.toml that installs each
PLUGINS = {"hydra/sweeper/optuna": "optuna", "hydra/launcher/submitit_slurm": "slurm",
           "hydra/launcher/submitit_local": "slurm", "hydra/launcher/joblib": ""}


def plugin_hint(message: str) -> str:
    """'; install it: pip install -e ".[optuna]"' when Hydra could not find a plugin's config, else ''."""
    for config, extra in PLUGINS.items():
        if f"Could not find '{config}'" in message:
            return f"; a Hydra plugin that is not installed: pip install -e \".{f'[{extra}]' if extra else ''}\""
    return ""


def first_line(error: BaseException) -> str:
    """Hydra's errors run to a dozen lines (the options, the search path, a hint); the first says what is
    wrong, and the first of its cause why ("Error merging override x=y: Value 'y' is not a valid bool")."""
    firsts = [next((line.strip().rstrip(".") for line in str(e).splitlines() if line.strip()), "")
              for e in (error, error.__cause__) if e]
    return ": ".join(line for line in firsts if line) or type(error).__name__


def check_choice(override: Override, options: list[str]) -> None:
    """init=foo, callbacks=[default,foo]: each option must be a config of the group."""
    line, group, value = override.input_line, override.key_or_group, override.value()
    accepted = f"accepted: {', '.join(options)}"
    if value is None:  # Hydra would stop with a traceback
        raise ConfigError(f"{line}: a config group takes one of its options, not null; {accepted}")
    if value == "":
        raise ConfigError(f"{line}: needs a value; {accepted}")
    for option in value if isinstance(value, list) else [value]:
        if option not in options:
            hint = plugin_hint(f"Could not find '{group}/{option}'") or f"; {accepted}"
            raise ConfigError(f"{override.get_key_element()}={option}: unknown {group}{hint}")


def check_setting(override: Override, defaults: dict) -> None:
    """optimizer.lr=fast: the key must exist, and the value have the type of its default."""
    key, value = override.key_or_group, override.value()
    default = find(override, defaults)
    if key in ANY_TYPE or override.is_hydra_override():
        return  # Hydra's own settings are typed: composing checks them
    expected = expected_type(default, value)
    if expected:
        raise ConfigError(f"{key}={show(value)}: expected {expected}")


def find(override: Override, defaults: dict) -> Any:
    """The default of the override's key; a ConfigError naming the nearest keys when there is none."""
    node = defaults
    for part in override.key_or_group.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ConfigError(no_such_setting(override, defaults))
    return node


def no_such_setting(override: Override, defaults: dict) -> str:
    """A guess at the key meant, else the keys there are where the path stops matching."""
    key = override.key_or_group
    parent, node = "", defaults
    for part in key.split(".")[:-1]:
        if not isinstance(node.get(part), dict):
            break
        parent, node = f"{parent}.{part}".lstrip("."), node[part]
    rest, prefix = key[len(parent) :].lstrip("."), f"{parent}." if parent else ""
    if "." not in rest:  # a typo in the last part: trainer.max_step
        guesses = [prefix + k for k in difflib.get_close_matches(rest, [str(k) for k in node], n=1)]
    else:  # a typo further up: optimzer.lr
        same_depth = [k for k in flat_keys(defaults) if k.count(".") == key.count(".")]
        guesses = difflib.get_close_matches(key, same_depth, n=1)
    guesses = guesses or [k for k in flat_keys(defaults) if k.endswith("." + key)][:3]  # lr: optimizer.lr
    if guesses:
        return f"{override.input_line}: no such setting; did you mean {' or '.join(guesses)}?"
    where = f"{parent} has" if parent else "top-level keys are"
    return f"{override.input_line}: no such setting; {where}: {', '.join(sorted(node, key=lambda k: k == 'hydra'))}"


def flat_keys(node: dict, prefix: str = ""):
    for key, value in node.items():
        yield prefix + str(key)
        if isinstance(value, dict):
            yield from flat_keys(value, f"{prefix}{key}.")


def expected_type(default: Any, value: Any) -> str | None:
    """What `value` must be to replace `default`, or None when it fits. A null or a string default takes
    anything, and an interpolation is left to OmegaConf."""
    if isinstance(value, str) and "${" in value:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if number and isinstance(value, int) else "an integer"
    if isinstance(default, float):
        return None if number else "a number"
    if isinstance(default, list):
        return None if isinstance(value, list) else "a list like [a,b]"
    return None


def show(value: Any) -> str:
    """A value as one would type it: 'abc', 1.5, null, true."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def check_writable(args: list[str], default: str = "outputs") -> None:
    """Fail before Hydra does, in one line, when the run or sweep directory cannot be written."""
    dirs = {a.partition("=")[0]: a.partition("=")[2] for a in args if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))}
    for key, path in (dirs or {"output directory": default}).items():
        if "${" in path:
            continue  # an interpolation: Hydra resolves it
        existing = Path(path).absolute()
        while not existing.exists():
            existing = existing.parent
        try:
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as e:
            raise ConfigError(f"{key}={path}: cannot write there ({e.strerror or e}); give a writable directory") from None


def explain(error: Exception) -> str | None:
    """The one-line message of an error caused by bad settings or data, else None (a programming
    error, which keeps its traceback): a ConfigError (DataError and checkpoint refusals are ones),
    or a ValueError/TypeError raised by a constructor Hydra called with the user's settings."""
    from_settings = False
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error, from_settings = error.__cause__, True  # Hydra wraps what a constructor raised
    if isinstance(error, ConfigError) or (from_settings and isinstance(error, (ValueError, TypeError))):
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None
