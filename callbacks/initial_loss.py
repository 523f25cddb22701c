"""Initial-loss check: before the first step, is the network as unsure as it should be?

An untrained model should give every character about the same probability, so its loss
should be near the uniform baseline ln(V) (3.30 for 27 characters). The lecture's naive
init starts at ~26-28 instead (27.9 on its first batch): confidently wrong, and the first
thousands of steps only undo that. Logs init/loss and init/uniform_loss at step 0 and warns when the start is bad.

In actgrad's own run (a datamodule with `splits`) the loss is measured on 4,096 fixed training
examples when training starts. In a plain Lightning Trainer it is the first optimizer step's loss,
on its first batch, before its update; init/uniform_loss = ln(num_classes) when num_classes is given.
"""

import logging
import math

import torch
import torch.nn.functional as F

from actgrad.diagnostic import Diagnostic
from actgrad.writer import Writer

log = logging.getLogger(__name__)


class InitialLoss(Diagnostic):
    def __init__(self, num_classes: int | None = None, num_examples: int = 4096, seed: int = 0, warn_ratio: float = 1.5):
        super().__init__(every_n_steps=1)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"InitialLoss.num_classes={num_classes!r}: must be a whole number >= 2, or None")
        self.num_classes = num_classes  # a plain Trainer's: ln(num_classes) is the uniform baseline
        self.num_examples = num_examples  # a fixed random sample of the training split
        self.seed = seed
        self.warn_ratio = warn_ratio  # warn when loss > warn_ratio * ln(V)
        self.done = False  # measured when training started (actgrad's run), or a resumed run

    def wants(self, step: int) -> bool:
        return step == 0 and not self.done

    @torch.no_grad()
    def measure(self, net, x, y) -> tuple[torch.Tensor, int]:
        """(loss, vocabulary size V) in training mode, as the first step sees it; BatchNorm's running statistics are kept."""
        buffers = {name: b.clone() for name, b in net.named_buffers()}
        was_training = net.training
        net.train()
        logits = net(x)
        net.train(was_training)
        for name, b in net.named_buffers():
            b.copy_(buffers[name])
        return F.cross_entropy(logits, y), logits.shape[-1]

    def on_train_start(self, trainer, pl_module):
        splits = getattr(trainer.datamodule, "splits", None)
        if trainer.global_step > 0 or splits is None:
            self.done = trainer.global_step > 0  # resumed: the start was checked by the first run
            return  # a plain Trainer: the first step's snapshot (observe)
        self.done = True
        x, y = splits["train"]
        generator = torch.Generator().manual_seed(self.seed)
        ix = torch.randperm(len(x), generator=generator)[: self.num_examples]
        loss, vocab = self.measure(pl_module.net, x[ix].to(pl_module.device).long(), y[ix].to(pl_module.device).long())
        self.report(Writer.of_run(trainer, pl_module), loss, vocab, f"on {len(ix)} training examples")

    def observe(self, snapshot):
        self.done = True
        self.report(self.writer, snapshot.loss, self.num_classes, "on the first batch")

    def report(self, writer, loss, vocab: int | None, where: str) -> None:
        uniform = math.log(vocab) if vocab else None
        values = {"init/loss": loss} | ({"init/uniform_loss": uniform} if vocab else {})
        loss = writer.scalars(values, 0)["init/loss"]
        if uniform is None:
            log.info("initial loss %.2f %s (InitialLoss(num_classes=...) compares it with ln(num_classes))", loss, where)
            return
        message = f"initial loss {loss:.2f} {where}; uniform baseline ln({vocab}) = {uniform:.2f}"
        if not loss <= self.warn_ratio * uniform:
            log.warning("%s: the network starts confidently wrong, as the lecture's naive init does. Scale the output "
                        "layer down (e.g. init=kaiming or init=scaled) so the first steps learn instead of undoing the init.",
                        message)
        else:
            log.info("%s", message)
