"""The base of every diagnostic in callbacks/: cadence, step hooks, one-transfer logging.

actgrad runs many optimizer steps per Lightning batch (see module.py), so a diagnostic is
told about individual steps by three hooks that the module calls *only on the steps the
diagnostic asked for* (`step % every_n_steps == 0`); on every other step it costs one
modulo. Forward/tensor hooks are registered once in `setup` and removed in `teardown`;
they look at `self.active` so they are free when idle.

    class MeanWeight(Diagnostic):
        def on_step_end(self, trainer, module, step):
            self.log_scalars(trainer, {"weight_mean/output": module.net.output.weight.mean()}, step)
"""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger


def write_scalars(trainer, scalars: dict, step: int) -> dict:
    """Stack on the device, move to the host in one transfer, write to every logger at `step`."""
    if not scalars:
        return {}
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in scalars.values()]).tolist()
    metrics = dict(zip(scalars, values))
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    return metrics


def tensorboard_writers(trainer):
    """The SummaryWriter of every TensorBoard logger: for histograms and images, which only it takes."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


class Diagnostic(L.Callback):
    def __init__(self, every_n_steps: int = 500):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"{type(self).__name__}.every_n_steps={every_n_steps!r}: must be a positive whole number")
        self.every_n_steps = every_n_steps
        self.active = False  # true from on_step_start to on_step_end of a step we watch

    def wants(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    # Step hooks, called by the module on wanted steps only. `step` counts optimizer steps
    # done before this one, so step 0 sees the untrained model.
    def on_step_start(self, trainer, module, step):
        """Before the forward pass."""

    def on_after_backward(self, trainer, module, step):
        """Gradients are in .grad; the parameters are not yet updated."""

    def on_step_end(self, trainer, module, step):
        """After optimizer.step(): parameters are updated."""

    def log_scalars(self, trainer, scalars: dict, step: int) -> dict:
        return write_scalars(trainer, scalars, step)

    def log_histograms(self, trainer, tensors: dict, step: int):
        writers = tensorboard_writers(trainer)
        for tag, tensor in tensors.items():
            values = tensor.detach().float().flatten()
            values = values[torch.isfinite(values)]  # TensorBoard's histogram rejects NaN and inf
            if values.numel():
                for writer in writers:
                    writer.add_histogram(tag, values.cpu(), step)
