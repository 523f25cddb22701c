"""A trained run, anywhere: `actgrad.load(run_dir_or_checkpoint)`, from nothing but the checkpoint.

    >>> import actgrad
    >>> run = actgrad.load("outputs/runs/2025-01-01_12-00-00")  # its checkpoints/last.ckpt
    >>> run.sample(3, seed=42)
    ['mora', 'kayah', 'seel']
    >>> run.model(torch.tensor([[0, 0, 0]])).softmax(-1)  # P(first character)

Every checkpoint holds the run's resolved config (`hyper_parameters`) and its vocabulary
(`checkpoint["actgrad"]["vocab"]`), so the network is rebuilt as actgrad.experiment.build
builds it (hydra.utils.instantiate of the config's model and norm), without reading the data
file, and given the trained weights. The checkpoint is read with weights_only=True
(actgrad.checkpoint.load): loading a file from someone else cannot run code.

"""

import functools
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from actgrad import checkpoint as checkpoint_file
from actgrad.data import VOCAB
from actgrad.experiment import DIVERGED_AT
from actgrad.module import LanguageModel


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


def load(path) -> Run:
    """The trained run at `path`: a run dir or a checkpoint file (.ckpt), needing nothing else.

    A run dir loads its checkpoints/last.ckpt: the final weights of a completed run (of a stopped
    one, the latest it saved). For another checkpoint (checkpoints/best.ckpt, lowest val/loss),
    give its file. A path that is no run dir, a run dir without a checkpoint, or a file that is
    no actgrad checkpoint is a one-line ValueError naming the path.
    """
    module, file, checkpoint = load_module(path)
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


def load_module(path) -> tuple[LanguageModel, Path, dict]:
    """(module, checkpoint file, checkpoint): the trained LanguageModel of a run dir or checkpoint,
    in eval mode on CPU; what load and LanguageModel.load_from_checkpoint give."""
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
    cfg = OmegaConf.create(config)
    try:
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's RNG alone
            norm = instantiate(cfg.norm) if cfg.get("norm") else None
            net = instantiate(cfg.model, vocab_size=len(vocab), block_size=cfg.data.block_size, norm=norm)
    except Exception as e:  # a target renamed since, a config by hand
        raise ValueError(f"{file}: cannot rebuild the model its config describes ({first_line(e)})") from None
    # no init rule: it only sets values, and every parameter and buffer comes from the checkpoint
    module = LanguageModel(
        net,
        optimizer=functools.partial(build_later, cfg.optimizer),  # built when fit asks: sampling needs neither
        scheduler=functools.partial(build_later, cfg.scheduler) if cfg.get("scheduler") else None,
        log_every_n_steps=cfg.get("log_every_n_steps", 100),
        val_every_n_steps=cfg.get("val_every_n_steps", 5000),
        config=config,
        diverge_above=DIVERGED_AT * math.log(len(vocab)),
        record={k: stored[k] for k in ("config_hash", "run_config") if k in stored},
        vocab=vocab,
    )
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{file}: its weights do not fit the model its config describes ({first_line(e)})") from None
    return module.eval(), file, checkpoint


def build_later(node: DictConfig, *args, **kwargs):
    """instantiate(node)(*args, **kwargs): an optimizer or scheduler partial of the config, made when used."""
    return instantiate(node)(*args, **kwargs)


def first_line(error: Exception) -> str:
    while error.__cause__ is not None:  # Hydra wraps what a constructor raised
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
