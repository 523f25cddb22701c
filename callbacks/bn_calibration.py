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
"""

import lightning as L
import torch
import torch.nn.functional as F

from actgrad.layers import BATCHNORMS, feeds, probe, untouched
from actgrad.writer import Writer


def running(module) -> bool:
    """A BatchNorm that normalizes with running statistics in eval mode."""
    return isinstance(module, BATCHNORMS) and module.track_running_stats and module.running_mean is not None


class Reached(Exception):
    """Raised by the hook at a norm's input: the forward pass has computed all that `moments` needs."""


class BNCalibration(L.Callback):
    def __init__(self, chunk: int = 4096):
        self.chunk = chunk  # examples per forward pass: the splits are stored compact, the model takes int64

    def on_train_end(self, trainer, pl_module):
        net = pl_module.net
        if not any(running(m) for m in net.modules()):
            return
        norms = self.norms(net, trainer.datamodule.splits["train"][0].shape[1])
        with untouched(net):  # the final checkpoint is saved after this hook: every buffer and mode put back
            net.eval()
            scalars = self.calibrate(net, norms, trainer.datamodule.splits, pl_module.device)
        Writer.of(trainer).scalars(scalars, trainer.global_step, layers=norms)  # a chart per quantity, a line per layer

    @staticmethod
    def norms(net, block_size: int) -> dict:
        """{name: BatchNorm} in call order (one probe, which changes nothing): named by the layer each feeds,
        or by its path (so is a second norm feeding the same layer)."""
        _, calls = probe(net, block_size, when="start")
        fed, norms = feeds(calls), {}
        for path, module in calls:
            if running(module) and module not in norms.values():
                name = fed.get(path, path)
                norms[name if name not in norms else path] = module
        return norms

    @torch.no_grad()
    def calibrate(self, net, norms: dict, splits: dict, device) -> dict:
        """The scalars; leaves every norm's running statistics set to the exact ones (eval mode)."""
        scalars = {"bn_calibration/val_loss_running": self.loss(net, *splits["val"], device)}
        x, _ = splits["train"]
        for name, norm in norms.items():  # in order: each layer's input depends on the ones before
            mean, var = self.moments(net, norm, x, device)
            scalars[f"bn_calibration/mean_error/{name}"] = ((norm.running_mean - mean).abs() / (var + norm.eps).sqrt()).mean()
            scalars[f"bn_calibration/var_error/{name}"] = ((norm.running_var - var).abs() / (var + norm.eps)).mean()
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
        scalars["bn_calibration/val_loss_calibrated"] = self.loss(net, *splits["val"], device)
        return scalars

    def moments(self, net, norm, x, device):
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
            for xc in x.split(self.chunk):
                try:
                    net(xc.to(device).long())
                except Reached:
                    pass
        finally:
            handle.remove()
        return mean, m2 / (count - 1)

    def loss(self, net, x, y, device) -> torch.Tensor:
        """Mean cross-entropy over a whole split, as LanguageModel.evaluate computes val/loss."""
        total = sum(F.cross_entropy(net(xc.to(device).long()), yc.to(device).long(), reduction="sum")
                    for xc, yc in zip(x.split(self.chunk), y.split(self.chunk)))
        return total / len(y)
