"""Bad settings, caught before anything is built or written: each a one-line ConfigError.

Nothing here imports torch or Lightning, so train.py can check its command line, and a
sweep's parent process can launch its jobs, without the ~4 s that importing them takes.
"""

import math
import shutil
import tempfile
from pathlib import Path

from hydra.errors import InstantiationException
from omegaconf import DictConfig


class ConfigError(ValueError):
    """A setting we cannot run with; the message names it and says what is accepted."""


def check_config(cfg: DictConfig) -> None:
    """Catch bad values before anything is built or written."""
    positive = {
        "optimizer.lr": cfg.optimizer.get("lr"),
        "trainer.max_steps": cfg.trainer.max_steps,
        "steps_per_batch": cfg.steps_per_batch,
        "log_every_n_steps": cfg.log_every_n_steps,
        "val_every_n_steps": cfg.val_every_n_steps,
    }
    for key, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: must be a number > 0")
    for key in ("log_every_n_steps", "val_every_n_steps"):
        if cfg[key] % cfg.steps_per_batch:
            raise ConfigError(
                f"{key}={cfg[key]}: must be a multiple of steps_per_batch={cfg.steps_per_batch} "
                "(the loop hands control back to Lightning only between batches)"
            )


def check_choices(args: list[str], conf_dir: Path) -> None:
    """`init=foo` on the command line: name the bad choice and the accepted ones, in one line.

    (Hydra would say it too, in fifteen lines with its search path.) Only plain values and
    comma lists are checked; sweep functions like glob() or choice() are left to Hydra.
    """
    for arg in args:
        group, _, values = arg.partition("=")
        folder = conf_dir / group
        if not values or "(" in values or group.startswith(("hydra", "+", "~")) or not folder.is_dir():
            continue
        accepted = sorted(p.stem for p in folder.glob("*.yaml"))
        for value in values.strip("[]").split(","):  # init=a,b (a sweep) or callbacks=[a,b] (a list)
            if value not in accepted:
                raise ConfigError(f"{group}={value}: unknown {group}; accepted: {', '.join(accepted)}")


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
    """The one-line message of an error caused by bad settings or data, else None."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__  # Hydra wraps what a constructor raised
    if isinstance(error, (ValueError, TypeError)):
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def remove_run_dir(run_dir: Path) -> None:
    """A run that never started leaves nothing behind: its directory, and its parent if now empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        Path(run_dir).parent.rmdir()  # only succeeds when empty
    except OSError:
        pass
