"""What a person sees first in TensorBoard: the saturation picture, the start-here card, custom charts."""

import io
import logging
import re

import numpy
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from actgrad.callbacks.saturation_figure import SaturationFigure
from actgrad.events import accumulate, read, subruns
from actgrad.snapshot import Layer, Snapshot
from actgrad.writer import Writer


class KeepingWriter(Writer):
    """A Writer that keeps the last Figure it wrote: where its panels are, in the PNG it wrote."""

    def figure(self, tag, figure, step):
        self.kept = figure
        super().figure(tag, figure, step)


def board(tmp_path, cls=Writer):
    return cls([TensorBoardLogger(str(tmp_path), name="", version="")])


def batch(seed, scale):
    """A known batch of pre-activations, 32 examples x 200 units, many past tanh's 0.99 (|x| > 2.65)."""
    return torch.randn(32, 200, generator=torch.Generator().manual_seed(seed)) * scale


def shot(step, pre):
    layers = {"layer1": Layer(act=nn.Tanh(), pre=pre, out=torch.tanh(pre)),
              "layer2": Layer(act=nn.ReLU(), pre=pre[:, :50], out=torch.relu(pre[:, :50]))}
    return Snapshot(step=step, loss=torch.tensor(3.0), lr=0.1, layers=layers)


def test_saturation_picture_is_white_where_the_unit_is_flat(tmp_path):
    diagnostic = SaturationFigure()
    diagnostic.writer, diagnostic.last_step = board(tmp_path, KeepingWriter), 99
    first, last = batch(0, 3.0), batch(1, 1.5)
    assert [s for s in range(100) if diagnostic.wants(s)] == [0, 99]
    diagnostic.observe(shot(0, first))
    diagnostic.observe(shot(99, last))
    diagnostic.on_train_end(None, None)
    diagnostic.writer.flush()

    (image,) = read(tmp_path).Images("figures/saturation")
    assert image.step == 99 and image.width == 1120
    pixels = numpy.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("L"))
    figure = diagnostic.writer.kept
    # the lecture's h.abs() > 0.99 for tanh; ReLU is flat (slope 0) where its input is <= 0
    expected = [first.tanh().abs() > 0.99, last.tanh().abs() > 0.99, first[:, :50] <= 0, last[:, :50] <= 0]
    panels = [figure.axes[0], figure.axes[1], figure.axes[2], figure.axes[3]]  # row by row: layer1, then layer2
    for ax, white in zip(panels, expected):
        box = ax.get_window_extent()
        rows, cols = white.shape
        ys = (pixels.shape[0] - box.y1 + (numpy.arange(rows) + 0.5) * box.height / rows).astype(int)  # row 0 on top
        xs = (box.x0 + (numpy.arange(cols) + 0.5) * box.width / cols).astype(int)
        drawn = pixels[numpy.ix_(ys, xs)]  # the pixel at each cell's centre
        assert set(numpy.unique(drawn)) <= {0, 255}
        assert numpy.array_equal(drawn == 255, white.numpy())
    assert 0.2 < expected[0].float().mean() < 0.8 and expected[1].float().mean() < expected[0].float().mean()
    assert diagnostic.batches == []  # drawn once


def test_saturation_picture_keeps_step_0_across_a_resume(tmp_path):
    before = SaturationFigure()
    before.last_step = 99
    before.observe(shot(0, batch(0, 3.0)))
    after = SaturationFigure()
    after.writer, after.last_step = board(tmp_path), 99
    after.load_state_dict(before.state_dict())  # a checkpoint taken between the two watched steps
    after.observe(shot(99, batch(1, 1.5)))
    assert [step for step, _ in after.batches] == [0, 99]
    with pytest.raises(ValueError, match=r"threshold=1\.5.*between 0 and 1"):
        SaturationFigure(threshold=1.5)


def layout_and_tags(tmp_path):
    """The custom-scalars charts a run wrote, and its scalar tags run by run ("": the run itself), as TensorBoard sees them."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = read(tmp_path)
    configs = events.Tensors("custom_scalars__config__") if "custom_scalars__config__" in events.Tags()["tensors"] else []
    charts = {}
    for config in configs:
        written = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
        charts |= {chart.title: list(chart.multiline.tag) for category in written.category for chart in category.chart}
    runs = {"": events.main} | {sub.name: accumulate(sub) for sub in subruns(tmp_path)}
    return len(configs), charts, {run: e.Tags()["scalars"] for run, e in runs.items()}


def test_a_chart_written_for_flat_layer_tags_shows_the_layers(tmp_path, caplog):
    """README's way of naming tags (dead/layer1) in a chart regex: TensorBoard shows those series as tag `dead` of
    the runs <run>/layer1, ..., which `dead/.*` does not match; the chart gets them, and the log says so."""
    writer = board(tmp_path)
    layout = {"Loss": {"loss": ["train/loss$"]},
              "Mine": {"dead units": ["dead/.*"], "grads": ["grad/.*"], "one layer": ["act/std/layer2$"]}}
    writer.charts(layout, wait=True)
    writer.tensorboards()[0].flush()
    assert layout_and_tags(tmp_path)[0] == 0  # no tag written yet: it waits for the first watched step's
    layers = {"layer1", "layer2", "output"}
    with caplog.at_level(logging.INFO, logger="actgrad.writer"), writer.batch():
        writer.scalars({"dead/layer1": 0.1, "dead/layer2": 0.2, "act/std/layer1": 0.4, "act/std/layer2": 0.5}, 0, layers)
        writer.scalars({"grad/layer1.weight": 1.0, "grad/output.weight": 2.0}, 0, layers)
    writer.scalars({"train/loss": 3.0}, 1)
    writer.flush()

    count, charts, tags = layout_and_tags(tmp_path)
    assert count == 1  # written once

    def shown(title):  # as TensorBoard's custom-scalars plugin: each run's scalar tags, re.match against each regex
        return sorted(f"{run}:{t}" for run, ts in tags.items() for t in ts if any(re.match(r, t) for r in charts[title]))

    assert shown("dead units") == ["layer1:dead", "layer2:dead"]
    assert shown("grads") == ["layer1:grad/weight", "output:grad/weight"]  # matched as written: nothing added
    assert shown("one layer") == ["layer1:act/std", "layer2:act/std"]  # the chart cannot pick a run: every layer's
    assert shown("loss") == [":train/loss"]
    lines = [r.getMessage() for r in caplog.records if "custom chart" in r.getMessage()]
    assert len(lines) == 2 and "'dead units'" in lines[0] and "dead/layer1" in lines[0] and "dead$" in lines[0]
    assert "'one layer'" in lines[1] and "act/std$" in lines[1]
