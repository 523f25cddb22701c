"""BatchNorm calibration, as the lecture ends: the running statistics against the exact ones.

While training, each BatchNorm layer keeps a running mean and variance of its input, an
exponential average over minibatches of a network that kept changing; at inference it
normalizes with them. The lecture ends by computing them exactly instead, in one pass over the
whole training split. Once, when training ends, this measures how far apart the two are and what
the exact ones would change on the validation loss. The model is left exactly as it was.

Every BatchNorm module (1-d, 2-d, 3-d, wherever it sits) that keeps running statistics is one,
named by the layer it feeds, layerN, when a watched nonlinearity is called after it (actgrad.layers:
the MLP's layer1, ...), else by its module path. Logged at the final step, for each (0 means exact):
    bn_calibration/mean_error/<name>  mean over channels of |running_mean - mean| / sqrt(var + eps):
                                      how far off the normalized output's centre is, in its own units
    bn_calibration/var_error/<name>   mean over channels of |running_var - var| / (var + eps)
and the validation loss in eval mode with the running statistics and with the exact ones:
    bn_calibration/val_loss_running, bn_calibration/val_loss_calibrated

mean and var (unbiased, as running_var) are per channel (dimension 1) over the whole training split
and every other dimension (the time of BatchNorm1d on (N, C, L)), taken norm by norm in call order,
in eval mode: a norm's input is computed with the norms called before it already calibrated, as the
calibrated network sees it. A network without BatchNorm logs nothing.

In a plain Lightning Trainer (a module of the user's, no actgrad data module) the "whole training split"
is the first `max_batches` batches of the train loader, run through the module's `forward` (without
one: said in one line, nothing logged), and the input of a batch is its first element
(a tuple or list: (x, y, ...)) or the batch itself; the norms are named from that forward's call order.
The validation losses are logged only where the module has a `validation_step` (and so a val loader):
the cross-entropy of forward(x) against y over `max_batches` val batches (a classifier's); a val batch
that is not (x, class labels) is said in one line, and the val losses left out.
"""

import logging
from itertools import islice

import lightning as L
import torch
import torch.nn.functional as F

from actgrad.layers import BATCHNORMS, feeds, probe, record_calls, untouched
from actgrad.writer import Writer

log = logging.getLogger(__name__)


def running(module) -> bool:
    """A BatchNorm that normalizes with running statistics in eval mode."""
    return isinstance(module, BATCHNORMS) and module.track_running_stats and module.running_mean is not None


class Reached(Exception):
    """Raised by the hook at a norm's input: the forward pass has computed all that `moments` needs."""


class BNCalibration(L.Callback):
    def __init__(self, chunk: int = 4096, max_batches: int = 100):
        self.chunk = chunk  # examples per forward pass: the splits are stored compact, the model takes int64
        self.max_batches = max_batches  # a plain Trainer's: of the train loader, and of the val loader

    def on_train_end(self, trainer, pl_module):
        splits = getattr(trainer.datamodule, "splits", None)
        net = pl_module.net if splits is not None else pl_module
        if not any(running(m) for m in net.modules()):
            return
        if splits is None and type(pl_module).forward is L.LightningModule.forward:
            log.warning("BNCalibration: %s has no forward(), which it runs on the train loader's inputs: "
                        "nothing calibrated", type(pl_module).__name__)
            return
        with untouched(net):  # the final checkpoint is saved after this hook: every buffer and mode put back
            net.eval()
            if splits is not None:
                norms = self.norms(net, splits["train"][0].shape[1])
                inputs = [xc.to(pl_module.device).long() for xc in splits["train"][0].split(self.chunk)]
                val = self.chunks(*splits["val"], pl_module.device)
            else:
                inputs = [x for x, _ in self.batches(trainer.train_dataloader, pl_module)]
                val = self.val_batches(trainer, pl_module)
                calls, handles = record_calls(net, "start")
                try:
                    net(inputs[0])
                finally:
                    for h in handles:
                        h.remove()
                norms = named(calls)
            scalars = self.calibrate(net, norms, inputs, val)
        Writer.of_run(trainer, pl_module).scalars(scalars, trainer.global_step, layers=norms)  # a chart per quantity, a line per layer

    def chunks(self, x, y, device) -> list:
        """A split as [(x, y)] of `chunk` examples, on the device, as the model takes them (int64)."""
        return [(xc.to(device).long(), yc.to(device).long()) for xc, yc in zip(x.split(self.chunk), y.split(self.chunk))]

    def batches(self, loader, pl_module) -> list:
        """[(input, rest)] of the first max_batches batches of a loader, on the module's device."""
        out = []
        for i, batch in enumerate(islice(loader, self.max_batches)):
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            out.append((batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None))
        return out

    def val_batches(self, trainer, pl_module) -> list | None:
        """The val batches, where the module has a validation_step and they are (x, class labels); else None."""
        if type(pl_module).validation_step is L.LightningModule.validation_step or trainer.val_dataloaders is None:
            return None
        loader = trainer.val_dataloaders[0] if isinstance(trainer.val_dataloaders, (list, tuple)) else trainer.val_dataloaders
        val = self.batches(loader, pl_module)
        if not val or any(y is None or y.is_floating_point() for _, y in val):
            log.info("BNCalibration: the val batches are not (x, class labels): no bn_calibration/val_loss_*")
            return None
        return val

    @staticmethod
    def norms(net, block_size: int) -> dict:
        """{name: BatchNorm} in call order, from one probe (which changes nothing)."""
        return named(probe(net, block_size, when="start")[1])

    @torch.no_grad()
    def calibrate(self, net, norms: dict, inputs: list, val: list | None) -> dict:
        """The scalars; leaves every norm's running statistics set to the exact ones over `inputs` (eval mode).
        With `val` ([(x, y)]), the val loss before and after."""
        scalars = {"bn_calibration/val_loss_running": self.loss(net, val)} if val else {}
        for name, norm in norms.items():  # in order: each layer's input depends on the ones before
            mean, var = self.moments(net, norm, inputs)
            scalars[f"bn_calibration/mean_error/{name}"] = ((norm.running_mean - mean).abs() / (var + norm.eps).sqrt()).mean()
            scalars[f"bn_calibration/var_error/{name}"] = ((norm.running_var - var).abs() / (var + norm.eps)).mean()
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
        if val:
            scalars["bn_calibration/val_loss_calibrated"] = self.loss(net, val)
        return scalars

    def moments(self, net, norm, inputs: list):
        """Exact mean and unbiased variance of norm's input over x, merged chunk by chunk
        (Chan et al.'s pairwise update: accurate in float32, where sum(x^2) - n mean^2 is not)."""
        count, mean, m2 = 0, 0.0, 0.0

        def take(module, inputs):
            nonlocal count, mean, m2
            h = inputs[0].movedim(1, -1).flatten(0, -2)  # (N, C, *) -> (N * ..., C): a row per value of a channel
            n, h_mean = len(h), h.mean(0)
            delta, total = h_mean - mean, count + len(h)
            mean = mean + delta * n / total
            m2 = m2 + ((h - h_mean) ** 2).sum(0) + delta ** 2 * count * n / total
            count = total

        def stop(module, inputs):
            take(module, inputs)
            raise Reached  # the rest of the forward pass (tanh, the layers after) is not needed

        handle = norm.register_forward_pre_hook(stop)
        try:
            for x in inputs:
                try:
                    net(x)
                except Reached:
                    pass
        finally:
            handle.remove()
        return mean, m2 / (count - 1)

    def loss(self, net, batches: list) -> torch.Tensor:
        """Mean cross-entropy over [(x, y)], as LanguageModel.evaluate computes val/loss."""
        total = sum(F.cross_entropy(net(x), y, reduction="sum") for x, y in batches)
        return total / sum(y.numel() for _, y in batches)


def named(calls: list) -> dict:
    """{name: BatchNorm} in call order (`calls` in start order): named by the layer each feeds,
    or by its path (so is a second norm feeding the same layer)."""
    fed, norms = feeds(calls), {}
    for path, module in calls:
        if running(module) and module not in norms.values():
            name = fed.get(path, path)
            norms[name if name not in norms else path] = module
    return norms
