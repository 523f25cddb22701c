"""The lecture's last plot: each weight's update-to-data ratio over training, with the -3 guide.

figures/update_ratio (IMAGES tab). The ratios are recorded every `every_n_steps` steps (cheap,
kept on the device) and drawn once, when training ends or stops on an error.
"""

import torch

from actgrad.diagnostic import Diagnostic
from actgrad.callbacks.figures import with_margins
from actgrad.callbacks.update_ratio import GUIDE, update_ratios


class UpdateRatioFigure(Diagnostic):
    needs = {"params", "updates"}

    def __init__(self, every_n_steps: int = 100, weights_only: bool = True):
        super().__init__(every_n_steps)
        self.weights_only = weights_only
        self.names, self.steps, self.history = [], [], []

    def observe(self, snapshot):
        ratios = update_ratios(snapshot, self.weights_only)
        self.names = list(ratios)
        self.steps.append(snapshot.step)
        self.history.append(torch.stack(list(ratios.values())))  # kept on the device: no transfer per step

    def on_train_end(self, trainer, pl_module):
        self.draw(trainer.global_step)

    # the history goes into checkpoints, so a resumed run draws the whole of it: as one tensor, since
    # torch.save pays per tensor (2,000 of them at the end of a default run)
    def state_dict(self):
        return {"names": self.names, "steps": self.steps,
                "history": torch.stack(self.history) if self.history else torch.empty(0)}

    def load_state_dict(self, state_dict):
        history = state_dict["history"]  # a list in checkpoints written before
        self.names, self.steps = state_dict["names"], state_dict["steps"]
        self.history = list(history.unbind(0)) if isinstance(history, torch.Tensor) else list(history)

    def on_exception(self, trainer, pl_module, exception):
        self.draw(trainer.global_step)

    def draw(self, step):
        if len(self.steps) < 2:
            return  # one point is no line
        from matplotlib.figure import Figure

        ratios = torch.stack(self.history).cpu()  # the whole history in one transfer
        figure = Figure(figsize=(14, 4.5), dpi=80)  # >= 1,000 px wide in TensorBoard
        ax = figure.add_subplot()
        for i, name in enumerate(self.names):
            ax.plot(self.steps, ratios[:, i].numpy(), label=name)
        ax.axhline(GUIDE, color="k", linestyle="--", label=f"guide: {GUIDE:g}")
        ax.set_title("update-to-data ratio: log10(std(update) / std(param)); about -3 is healthy", fontsize=12)
        ax.set(xlabel="step", ylabel="log10 ratio")
        ax.legend(fontsize=10, loc="upper right")
        self.writer.figure("figures/update_ratio", with_margins(figure), step)
