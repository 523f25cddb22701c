"""Initial-loss check: before the first step, is the network as unsure as it should be?

An untrained model should give every character about the same probability, so its loss
should be near the uniform baseline ln(V) (3.30 for 27 characters). The lecture's naive
init starts at ~26-28 instead (27.9 on its first batch): confidently wrong, and the first
thousands of steps only undo that. Logs init/loss and init/uniform_loss at step 0 and warns when the start is bad.
"""

import logging
import math

import lightning as L
import torch
import torch.nn.functional as F

from actgrad.writer import Writer

log = logging.getLogger(__name__)


class InitialLoss(L.Callback):
    def __init__(self, num_examples: int = 4096, seed: int = 0, warn_ratio: float = 1.5):
        self.num_examples = num_examples  # a fixed random sample of the training split
        self.seed = seed
        self.warn_ratio = warn_ratio  # warn when loss > warn_ratio * ln(V)

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
        if trainer.global_step > 0:
            return  # resumed: the start was checked by the first run
        x, y = trainer.datamodule.splits["train"]
        generator = torch.Generator().manual_seed(self.seed)
        ix = torch.randperm(len(x), generator=generator)[: self.num_examples]
        loss, vocab = self.measure(pl_module.net, x[ix].to(pl_module.device).long(), y[ix].to(pl_module.device).long())
        uniform = math.log(vocab)
        loss = Writer.of(trainer).scalars({"init/loss": loss, "init/uniform_loss": uniform}, 0)["init/loss"]
        message = f"initial loss {loss:.2f} on {len(ix)} training examples; uniform baseline ln({vocab}) = {uniform:.2f}"
        if not loss <= self.warn_ratio * uniform:
            log.warning("%s: the network starts confidently wrong, as the lecture's naive init does. Scale the output "
                        "layer down (e.g. init=kaiming or init=scaled) so the first steps learn instead of undoing the init.",
                        message)
        else:
            log.info("%s", message)
