"""The one place that writes what a run logs: scalars, histograms, figures, charts, text.

Diagnostics and the training loop hand it tensors; it moves them to the host in one transfer
per call and writes them to every configured logger (TensorBoard also takes histograms,
figures, charts and text; other loggers take the scalars).
"""

import torch
from lightning.pytorch.loggers import TensorBoardLogger


class Writer:
    def __init__(self, loggers):
        self.loggers = list(loggers)

    @classmethod
    def of(cls, trainer) -> "Writer":
        return cls(trainer.loggers)

    def tensorboards(self):
        """The SummaryWriter of every TensorBoard logger: histograms, images and charts go only there."""
        return [logger.experiment for logger in self.loggers if isinstance(logger, TensorBoardLogger)]

    def scalars(self, values: dict, step: int) -> dict:
        """Stack on the device, move to the host in one transfer, write to every logger at `step`."""
        if not values:
            return {}
        floats = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in values.values()]).tolist()
        metrics = dict(zip(values, floats))
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        return metrics

    def histograms(self, tensors: dict, step: int) -> None:
        writers = self.tensorboards()
        for tag, tensor in tensors.items():
            values = tensor.detach().float().flatten()
            values = values[torch.isfinite(values)]  # TensorBoard's histogram rejects NaN and inf
            if values.numel():
                for writer in writers:
                    writer.add_histogram(tag, values.cpu(), step)

    def figure(self, tag: str, figure, step: int) -> None:
        for writer in self.tensorboards():
            writer.add_figure(tag, figure, step, close=False)

    def charts(self, layout: dict) -> None:
        """TensorBoard's custom-scalars layout: {category: {chart title: [tag regex, ...]}}."""
        layout = {category: {title: ["Multiline", list(tags)] for title, tags in charts.items()}
                  for category, charts in layout.items() if charts}
        if layout:
            for writer in self.tensorboards():
                writer.add_custom_scalars(layout)

    def text(self, tag: str, text: str, step: int) -> None:
        for writer in self.tensorboards():
            writer.add_text(tag, text, step)
