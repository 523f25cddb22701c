"""Checkpoints: written so a kill cannot tear them, read so they cannot run code, and resumed
only into the run that made them.

A run is defined by its config minus what only changes how it is watched or where it is
written (cadences, diagnostics, paths, threads: actgrad.keys): `run_config`. Its hash goes into run.yaml
(written when a run starts) and into every checkpoint, and an attempt resumes a run dir or a
`ckpt_path` only when the hashes match. Both also record the parameter shapes, outside the hash:
one's own model can change them under the same config, and a resume with other shapes is refused.
`init_from=<checkpoint>` starts a new run from another run's weights instead.
"""

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from actgrad.checks import ConfigError
from actgrad.keys import flatten, role

class Refused(ConfigError):
    """This attempt may not start: the message is one line with the way out."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write next to the target under a name of this process's own, fsync, then rename over it:
    a kill at any moment leaves either the old checkpoint or the new one, never half of one, and
    a failed write (a full disk) leaves no partial file behind."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load(path, map_location)


def load(path, map_location="cpu", key: str | None = None) -> dict:
    """A checkpoint's contents, or a one-line ValueError naming `key=path`. Only tensors and plain
    containers are accepted (weights_only): a checkpoint from someone else cannot run code when loaded."""
    path = Path(path)
    name = f"{key}={path}" if key else str(path)
    if not path.is_file():
        raise Refused(f"{name}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise Refused(f"{name}: holds objects other than tensors and plain containers; refused, "
                         "since loading it could run code") from None
    except Exception as e:  # torch's message names the archive's fault: say it, and the way out
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "").split(". ")[0].rstrip(".")
        raise Refused(f"{name}: not a readable checkpoint, cut short or damaged ({type(e).__name__}: {reason}); "
                      "move it aside to resume from an earlier one or start over") from None


def run_config(cfg: DictConfig, data_sha256: str) -> dict:
    """The settings that define what a run computes, flat, with the data's digest, not its path."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in flat.items() if role(k).defines_run} | {"data.sha256": data_sha256}


def config_hash(run_cfg: dict) -> str:
    return hashlib.sha256(json.dumps(run_cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: dict, new: dict, limit: int = 4) -> str:
    """`optimizer.lr 0.1 -> 0.01, ...`: the keys whose values differ, for a one-line message."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "(unset)") != new.get(k, "(unset)"))
    said = [f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys[:limit]]
    return ", ".join(said) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class AlreadyCompleted(Exception):
    def __init__(self, status: dict):
        self.status = status


@dataclass
class Start:
    """Where an attempt starts: from scratch, or from a checkpoint of the same run."""

    ckpt_path: str | None = None
    step: int = 0
    init_weights: dict | None = None  # init_from: another run's weights, fresh optimizer, step 0


def check_same_run(found: dict | None, ours: dict, where: str, hint_ckpt: str | None) -> None:
    """Refuse, in one line naming the differing settings and the ways out, unless `found` is this run."""
    way_out = "give another hydra.run.dir (hydra.sweep.dir in a sweep)"
    if hint_ckpt:
        way_out += f", or start a new run from its weights with init_from={hint_ckpt}"
    if found is None or "config_hash" not in found:
        raise Refused(f"{where} has no record of the config that made it (written by an older actgrad): "
                      f"it cannot be resumed safely; {way_out}")
    if found["config_hash"] != ours["config_hash"]:
        diff = differences(found.get("run_config", {}), ours["run_config"])
        raise Refused(f"{where} was made with another config ({diff}); {way_out}")


def check_same_shapes(found: dict | None, ours: dict, where: str) -> None:
    """Refuse, in one line naming the first parameter whose shape differs, a run whose model has other shapes
    under the same config (a model's code changed since). A record without shapes (an older actgrad's) passes."""
    old, new = (found or {}).get("shapes"), ours.get("shapes")
    if old is None or new is None:
        return
    for name in list(new) + [n for n in old if n not in new]:
        if old.get(name) != new.get(name):
            there, here = (tuple(shapes[name]) if name in shapes else "absent" for shapes in (old, new))
            raise Refused(f"{where} holds a model of other shapes ({name} is {there} there, {here} now: the model's "
                          "code changed since); give another hydra.run.dir (hydra.sweep.dir in a sweep)")


def plan_start(run_dir: Path, cfg: DictConfig, record: dict, status: dict | None, run_yaml: dict | None) -> Start:
    """Decide where this attempt starts, or raise Refused / AlreadyCompleted. Nothing is written."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if run_yaml is not None:
        check_same_run(run_yaml, record, f"{run_dir} (run.yaml)", str(last) if last.is_file() else None)
        check_same_shapes(run_yaml, record, f"{run_dir} (run.yaml)")  # before `completed`: its results are another model's
        if status and status.get("status") == "completed" and not cfg.ckpt_path:
            raise AlreadyCompleted(status)
    start = Start()
    path = cfg.ckpt_path or (str(last) if last.is_file() else None)
    if path:
        checkpoint = load(path, key="ckpt_path" if cfg.ckpt_path else None)
        where = f"ckpt_path={path}" if cfg.ckpt_path else str(path)
        check_same_run(checkpoint.get("actgrad"), record, where, path)
        check_same_shapes(checkpoint.get("actgrad"), record, where)
        start.ckpt_path, start.step = str(path), int(checkpoint.get("global_step", 0))
    if cfg.get("init_from") and not start.ckpt_path:
        start.init_weights = load(cfg.init_from, key="init_from").get("state_dict", {})
    return start


def check_shapes(state: dict, module, source: str) -> None:
    """One line if a state dict does not fit the module (init_from of another model)."""
    for name, tensor in module.state_dict().items():
        if name not in state or state[name].shape != tensor.shape:
            got = tuple(state[name].shape) if name in state else "nothing"
            raise Refused(f"init_from={source}: is of another model: {name} is {got} there, "
                          f"{tuple(tensor.shape)} in this config")


class LastCheckpoint(Callback):
    """checkpoints/last.ckpt every `every_n_steps` optimizer steps and when training ends, however
    it ends (max_steps, a signal): what a killed or stopped run resumes from, and the final weights.
    (Lightning's ModelCheckpoint saves on a cadence but not when training stops between two.)"""

    def __init__(self, dirpath, every_n_steps: int = 50000):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps={every_n_steps!r}: must be a positive whole number")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self.saved_at = None

    def save(self, trainer):
        if self.saved_at != trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)  # the optimizer and loops too: a resumable checkpoint
            self.saved_at = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module):
        self.save(trainer)
