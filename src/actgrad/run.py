"""A trained run, anywhere: `actgrad.load(run_dir_or_checkpoint)`, from nothing but the checkpoint.

    >>> import actgrad
    >>> run = actgrad.load("outputs/runs/2025-01-01_12-00-00")  # its checkpoints/last.ckpt
    >>> run.sample(3, seed=42)
    ['mora', 'kayah', 'seel']
    >>> run.model(torch.tensor([[0, 0, 0]])).softmax(-1)  # P(first character)

Every checkpoint holds the run's resolved config (`hyper_parameters`) and its vocabulary
(`checkpoint["actgrad"]["vocab"]`), so the network is rebuilt as actgrad.experiment.build
builds it (hydra.utils.instantiate of the config's model and norm), without reading the data
file, and given the trained weights.

Loading a file from someone else runs no code of theirs, nor any function they name:
- the checkpoint is read with weights_only=True (actgrad.checkpoint.load): tensors and plain
  containers only, no pickled objects;
- before anything is built, every `_target_` in the config nodes load instantiates (model, norm,
  optimizer, scheduler; at any depth) must name a class or function defined in actgrad's modules
  of models, optimizers and schedules (run.ALLOWED), torch.nn or torch.optim, or what the caller
  vouches for: `actgrad.load(path, model=mypkg.Net)` (that class), `allow=("mypkg",)` (that
  package). A name that only leads there is refused too (actgrad.experiment.os.system is
  os.system), and so is an interpolation in those nodes (a resolved config has none; one could
  stand for a target). Anything else is a one-line ValueError, raised before anything is called.

    >>> run = actgrad.load("outputs/runs/mine", model=mypkg.Net)  # a run of one's own model class

"""

import functools
import math
import pydoc
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from actgrad import checkpoint as checkpoint_file
from actgrad.data import VOCAB
from actgrad.experiment import DIVERGED_AT, build_net
from actgrad.module import LanguageModel

BUILT = ("model", "norm", "optimizer", "scheduler")  # the config nodes load instantiates (the last two in build_later)
# actgrad's modules of models, optimizers and schedules (not all of actgrad: actgrad.rundir.write_atomic would
# write any file a config names); torch's layers, optimizers and lr schedulers. A new module of models goes here.
ALLOWED = ("actgrad.model", "actgrad.optim", "actgrad.schedule", "torch.nn", "torch.optim")
NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # a dotted Python name, nothing to resolve or evaluate
ALLOW_HINT = "or pass model=... or allow=..."  # how a caller lets its own code through (scripts/sample.py: --allow)


@dataclass(repr=False)
class Run:
    """A trained run: its module, its vocabulary and context size, its config, where it came from."""

    model: LanguageModel  # in eval mode, on CPU; model(idx) gives logits, model.net is the bare network
    vocab: str  # the symbols in index order: vocab[0] is '.', the start and end token
    block_size: int  # characters of context the model takes
    config: DictConfig  # the resolved config the run was trained with
    checkpoint: Path  # the file the weights came from
    step: int  # optimizer steps the weights had taken

    def __repr__(self) -> str:
        return (f"Run({str(self.checkpoint)!r}, step={self.step}, vocab={self.vocab!r}, "
                f"block_size={self.block_size})")

    def encode(self, text: str) -> list[int]:
        """The vocabulary indices of text's characters ('.' is 0)."""
        unknown = sorted(set(text) - set(self.vocab))
        if unknown:
            raise ValueError(f"{''.join(unknown)!r}: not in this run's vocabulary {self.vocab!r}")
        return [self.vocab.index(c) for c in text]

    @torch.no_grad()
    def sample(self, n: int = 20, seed: int = 2147483647, max_length: int = 100) -> list[str]:
        """n names, one character at a time as in the lecture, until '.' (or max_length characters).

        The same seed gives the same names; the model is evaluated in eval mode (BatchNorm uses its
        running statistics) on whatever device it is on, the draws are made on the CPU."""
        net = self.model.net
        was_training = net.training
        net.eval()
        generator = torch.Generator().manual_seed(seed)
        device = next(net.parameters()).device
        names = []
        try:
            for _ in range(n):
                context, out = [0] * self.block_size, []
                while len(out) < max_length:
                    logits = net(torch.tensor([context], device=device))
                    ix = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).item()
                    if ix == 0:
                        break
                    out.append(self.vocab[ix])
                    context = context[1:] + [ix]
                names.append("".join(out))
        finally:
            net.train(was_training)
        return names


def load(path, model=None, allow=()) -> Run:
    """The trained run at `path`: a run dir or a checkpoint file (.ckpt), needing nothing else.

    A run dir loads its checkpoints/last.ckpt: the final weights of a completed run (of a stopped
    one, the latest it saved). For another checkpoint (checkpoints/best.ckpt, lowest val/loss),
    give its file. A path that is no run dir, a run dir without a checkpoint, or a file that is
    no actgrad checkpoint is a one-line ValueError naming the path.

    The config may name only actgrad's models, optimizers and schedules, torch.nn's and torch.optim's, or
    `model` (a class of one's own: its module.qualname) and what is under the names in `allow`
    (e.g. ("mypkg",)); anything else is a one-line ValueError, raised before anything is called.
    """
    module, file, checkpoint = load_module(path, model=model, allow=allow)
    return Run(module, module.vocab, int(checkpoint["hyper_parameters"]["data"]["block_size"]),
               OmegaConf.create(checkpoint["hyper_parameters"]), file, int(checkpoint.get("global_step", 0)))


def checkpoint_of(path) -> Path:
    """The checkpoint a path names: a file as given, a run dir's checkpoints/last.ckpt."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):  # a run dir, its checkpoints/
            if candidate.is_file():
                return candidate
        others = sorted(path.glob("checkpoints/*.ckpt")) or sorted(path.glob("*.ckpt"))
        hint = f"; it has {others[0].relative_to(path)}: give that file" if others else ""
        raise ValueError(f"{path}: no checkpoint in this run dir (no checkpoints/last.ckpt{hint})")
    if not path.exists():
        raise ValueError(f"{path}: no such run dir or checkpoint")
    return path


def load_module(path, model=None, allow=()) -> tuple[LanguageModel, Path, dict]:
    """(module, checkpoint file, checkpoint): the trained LanguageModel of a run dir or checkpoint,
    in eval mode on CPU; what load and LanguageModel.load_from_checkpoint give. `model`, `allow`:
    what else its config may name (load)."""
    allowed = allowed_names(model, allow)  # a bad argument is the caller's error, before the file is read
    file = checkpoint_of(path)
    if not zipfile.is_zipfile(file):  # what torch.save writes; torch.load would call a text file a pickle
        raise ValueError(f"{file}: not a checkpoint (torch.save writes a zip archive; this is not one)")
    checkpoint = checkpoint_file.load(file)  # tensors and plain containers only; one-line errors
    config = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or not isinstance(state, dict) or "model" not in config or "data" not in config:
        raise ValueError(f"{file}: not a checkpoint of an actgrad run (it has no run config and weights)")
    stored = checkpoint.get("actgrad") or {}
    vocab = stored.get("vocab", VOCAB)  # none: written by an actgrad whose vocabulary was always '.' + a-z
    refuse_unknown_targets(file, config, allowed)  # before instantiate calls anything the file names
    cfg = OmegaConf.create(config)
    try:
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's RNG alone
            net = build_net(cfg, len(vocab), config["data"].get("block_size"))
    except Exception as e:  # a target renamed since, a config by hand
        raise ValueError(f"{file}: cannot rebuild the model its config describes ({root_cause(e)})") from None
    # no init rule: it only sets values, and every parameter and buffer comes from the checkpoint
    module = LanguageModel(
        net,
        optimizer=functools.partial(build_later, cfg.optimizer),  # built when fit asks: sampling needs neither
        scheduler=functools.partial(build_later, cfg.scheduler) if cfg.get("scheduler") else None,
        log_every_n_steps=config.get("log_every_n_steps", 100),  # the plain values: no resolver runs
        val_every_n_steps=config.get("val_every_n_steps", 5000),
        config=config,
        diverge_above=DIVERGED_AT * math.log(len(vocab)),
        record={k: stored[k] for k in ("config_hash", "run_config") if k in stored},
        vocab=vocab,
    )
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{file}: its weights do not fit the model its config describes ({root_cause(e)})") from None
    return module.eval(), file, checkpoint


def allowed_names(model=None, allow=()) -> tuple[str, ...]:
    """The names load may build from: ALLOWED, `model`'s own (module.qualname), those under `allow`."""
    if isinstance(allow, str):  # allow="mypkg": one name, not its letters
        allow = (allow,)
    bad = [a for a in allow if not isinstance(a, str) or not NAME.fullmatch(a.rstrip("."))]
    if bad:
        raise ValueError(f"allow={bad[0]!r}: not a dotted name; give package or module names, e.g. allow=('mypkg',)")
    names = ALLOWED + tuple(a.rstrip(".") for a in allow)
    if model is None:
        return names
    module, qualname = getattr(model, "__module__", None), getattr(model, "__qualname__", None)
    name = f"{module}.{qualname}"
    if not callable(model) or not isinstance(module, str) or not isinstance(qualname, str) or not NAME.fullmatch(name):
        raise ValueError(f"model={model!r}: not a class or function importable by its name; give the class "
                         "the run's config names, e.g. model=mypkg.Net")
    return names + (name,)


def refuse_unknown_targets(file, config: dict, allowed: tuple[str, ...]) -> None:
    """A one-line ValueError naming the first target (or interpolation) in the nodes load instantiates
    that it may not build: see `builds`."""
    for key, value in (found for name in BUILT for found in targets(config.get(name), name)):
        if not builds(value, allowed):
            shown = value if isinstance(value, str) and NAME.fullmatch(value) else repr(value)
            what = "which actgrad.load does not build" if key.endswith("_target_") else \
                "an interpolation, which actgrad.load does not resolve"  # it could stand for a target
            raise ValueError(f"{file}: its config names {key}={shown}, {what} (allowed: "
                             f"{', '.join(n + '.*' for n in allowed)}; {ALLOW_HINT})")


def targets(node, key: str) -> list[tuple[str, object]]:
    """(dotted key, value) of every `_target_` in node, at any depth (lists too), and of every string
    holding an interpolation (resolved, it could name a target or a whole node)."""
    if isinstance(node, dict):
        return [found for k, v in node.items()
                for found in ([(f"{key}.{k}", v)] if k == "_target_" else targets(v, f"{key}.{k}"))]
    if isinstance(node, list):
        return [found for i, v in enumerate(node) for found in targets(v, f"{key}[{i}]")]
    return [(key, node)] if isinstance(node, str) and "${" in node else []


def builds(target, allowed: tuple[str, ...]) -> bool:
    """Whether load may call `target`: a dotted name under one of `allowed` (a package, module or
    object name) that names an object defined there, not one it only imports (actgrad.experiment.os.system
    is os.system). Only modules under `allowed` are imported to find out."""
    if not isinstance(target, str) or not NAME.fullmatch(target) or not under(target, allowed):
        return False
    try:
        found = pydoc.locate(target)  # imports and looks up as Hydra's instantiate does
    except Exception:  # nothing to call: instantiate says which name it cannot find (a target renamed since)
        return True
    if found is None:
        return True
    return under(f"{getattr(found, '__module__', None)}.{getattr(found, '__qualname__', None)}", allowed)


def under(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def build_later(node: DictConfig, *args, **kwargs):
    """instantiate(node)(*args, **kwargs): an optimizer or scheduler partial of the config, made when used."""
    return instantiate(node)(*args, **kwargs)


def root_cause(error: Exception) -> str:
    while error.__cause__ is not None:  # Hydra wraps what a constructor raised
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
