"""BatchNorm calibration, as the lecture ends: the running statistics against the exact ones.

While training, each BatchNorm layer keeps a running mean and variance of its input, an
exponential average over minibatches of a network that kept changing; at inference it
normalizes with them. The lecture ends by computing them exactly instead, in one pass over the
whole training split. Once, when training ends, this measures how far apart the two are and what
the exact ones would change on the validation loss. The model is left exactly as it was.

Logged at the final step, for each hidden layer N with BatchNorm (0 means exact):
    bn_calibration/mean_error/layerN  mean over units of |running_mean - mean| / sqrt(var + eps):
                                      how far off the normalized output's centre is, in its own units
    bn_calibration/var_error/layerN   mean over units of |running_var - var| / (var + eps)
and the validation loss in eval mode with the running statistics and with the exact ones:
    bn_calibration/val_loss_running, bn_calibration/val_loss_calibrated

mean and var (unbiased, as running_var) are over the whole training split, taken layer by layer
in eval mode: layer N's input is computed with layers 1..N-1 already calibrated, as the
calibrated network sees it. A network without BatchNorm logs nothing.
"""

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from actgrad.writer import Writer


class Reached(Exception):
    """Raised by the hook at a norm's input: the forward pass has computed all that `moments` needs."""


class BNCalibration(L.Callback):
    def __init__(self, chunk: int = 4096):
        self.chunk = chunk  # examples per forward pass: the splits are stored compact, the model takes int64

    def on_train_end(self, trainer, pl_module):
        net = pl_module.net
        norms = {f"layer{i}": block.norm for i, block in enumerate(net.blocks, 1)
                 if isinstance(getattr(block, "norm", None), nn.BatchNorm1d) and block.norm.track_running_stats}
        if not norms:
            return
        # the final checkpoint is saved after this hook: put back every buffer and each module's mode
        buffers = {name: b.clone() for name, b in net.named_buffers()}
        modes = {m: m.training for m in net.modules()}
        net.eval()
        try:
            scalars = self.calibrate(net, norms, trainer.datamodule.splits, pl_module.device)
        finally:
            with torch.no_grad():
                for name, b in net.named_buffers():
                    b.copy_(buffers[name])
            for m, mode in modes.items():
                m.training = mode
        Writer.of(trainer).scalars(scalars, trainer.global_step, layers=norms)  # a chart per quantity, a line per layer

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
            h = inputs[0]
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
