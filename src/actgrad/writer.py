"""The one place that writes what a run logs: scalars, histograms, figures, charts, text.

Diagnostics and the training loop hand it tensors. `write` (and `scalars`, `histograms`, which
call it) reduces each histogram's tensor on its device to min, max, sum, sum of squares and the
counts of BUCKETS equal buckets over [min, max], moves those and the scalars to the host in one
transfer, and writes them as one TensorBoard event (one Summary of many values) to every
TensorBoard logger; other loggers take the scalars (Weights & Biases the histograms too).
Figures go to TensorBoard, W&B and MLflow; charts and text to TensorBoard only. A histogram of a tensor holding NaN or inf
is written without them, and `<tag>/nonfinite` (a scalar) says how many there were.

Those events go to an event file of this writer's own (EventFile) beside the logger's, in
TensorBoard's record format, checksummed in C by the `crc32c` package and written at once:
torch's SummaryWriter checksums every byte in Python, on a thread that takes the interpreter
lock from the training loop (with every diagnostic on, that made training markedly slower:
docs/performance.md). The file is named after the logger's own file plus ".actgrad", so
TensorBoard reads it right after that one: a resumed run's purge marker (at the start of its
logger's file) drops what the killed attempt wrote here past its checkpoint too. Figures,
charts and text go through the logger's SummaryWriter (without `crc32c` installed, everything
does), which writes on a thread: `flush` writes out what it still holds, before a checkpoint.

TensorBoard colours lines by run only, so each layer's series go to a run of their own (a
subrun: a subdirectory of the logger's dir, as Keras's logs/train and logs/validation), where the
tag is the quantity: act/saturation/layer1 is tag act/saturation of subrun layer1,
update_ratio/layer1.weight tag update_ratio/weight of subrun layer1. One card or chart per
quantity then shows a line, and a colour, per layer. Only tags written with `layers` (the model's
layer names; diagnostics pass them) split: losses, init/* and final/* stay in the run itself, and
loggers other than TensorBoard keep the flat tags. The first value of a tag in a subrun's file
names its flat tag (actgrad.events reads them back under it). A subrun's file is named after its
logger's file and starts with that file's purge marker, so a resumed run drops what the killed
attempt wrote past its checkpoint in subruns too. Without `crc32c`, a torch FileWriter per subrun
writes its events (flushed at each one).
"""

import io
import logging
import math
import os
import re
import socket
import struct
import time
from contextlib import contextmanager
from itertools import chain, islice

import numpy
import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.writer import FileWriter

from actgrad.events import SUBRUN_PLUGIN, subruns

try:
    from crc32c import crc32c  # C (hardware where there is one): the `crc32c` package
except ImportError:  # without it, events go through the SummaryWriter (and its checksum in Python)
    crc32c = None

log = logging.getLogger(__name__)

BUCKETS = 30  # per histogram: TensorBoard's own display rebins to about as many


class Writer:
    def __init__(self, loggers):
        self.loggers = list(loggers)
        self.pending = None  # inside batch(): {step: (scalars, histograms)} not written yet
        self.latest = {}  # {tag: the last scalar written}: the final values of a run without TensorBoard
        self.routes = {}  # {flat tag: (subrun, tag there)} of the per-layer series seen so far
        self.waiting = None  # a custom-scalars layout waiting for the first watched step's tags (charts)

    @classmethod
    def of(cls, trainer) -> "Writer":
        return cls(trainer.loggers)

    @classmethod
    def of_run(cls, trainer, pl_module) -> "Writer":
        """Where a callback writes for `pl_module`'s run: an actgrad module's own writer (a stacked member's
        module has its member's loggers: actgrad.group), else the trainer's loggers."""
        own = getattr(pl_module, "writer", None)
        return own if isinstance(own, Writer) else cls.of(trainer)

    def tensorboards(self):
        """The SummaryWriter of every TensorBoard logger: histograms, images and charts go only there."""
        return [logger.experiment for logger in self.loggers if isinstance(logger, TensorBoardLogger)]

    def scalars(self, values: dict, step: int, layers=()) -> dict:
        """Stack on the device, move to the host in one transfer, write to every logger at `step`."""
        return self.write(values, {}, step, layers)

    def histograms(self, tensors: dict, step: int, layers=()) -> None:
        """One histogram per {tag: tensor} (TensorBoard only), at `step`."""
        self.write({}, tensors, step, layers)

    def write(self, scalars: dict, histograms: dict, step: int, layers=()) -> dict:
        """Scalars ({tag: number or one-element tensor}) and histograms ({tag: tensor}) of one step:
        one device-to-host transfer, one event per TensorBoard logger and run. Returns the scalars as
        floats, with `<histogram tag>/nonfinite` for each histogram that held NaN or inf.
        `layers`: the model's layer names; a tag ending in one (act/std/layer1) or in one of its
        parameters (update_ratio/layer1.weight) goes to that layer's subrun in TensorBoard (see `subrun`)."""
        if not scalars and not histograms:
            return {}
        if self.waiting is not None and step > 0:  # step 0's tags are all written
            self.charts(self.waiting)
        if layers:
            for tag in chain(scalars, histograms):
                if tag not in self.routes:
                    self.routes[tag] = subrun(tag, layers)
        hist_tags = [tag for tag, t in histograms.items() if t.numel()]
        floats, rows = to_host(list(scalars.values()), [histogram_row(histograms[tag]) for tag in hist_tags])
        metrics, hists = dict(zip(scalars, floats)), {}
        for tag, row in zip(hist_tags, rows):
            if not all(map(math.isfinite, row[:4])):  # NaN or inf inside (or squares past float32): again, exactly
                values = histograms[tag].detach().reshape(-1).double().cpu()
                finite = values[torch.isfinite(values)]
                if len(finite) < len(values):
                    metrics[f"{tag}/nonfinite"] = float(len(values) - len(finite))
                if not len(finite):
                    continue
                row = to_host([], [histogram_row(finite)])[1][0]
            hists[tag] = histogram_proto(row)
        self.latest.update(metrics)
        if self.pending is not None:  # batch(): merged into the step's one event
            held = self.pending.setdefault(step, ({}, {}))
            held[0].update(metrics)
            held[1].update(hists)
        elif metrics or hists:
            self.emit(metrics, hists, step)
        return metrics

    @contextmanager
    def batch(self):
        """Every write inside is still moved to the host at once (its floats are returned), but
        written when the block ends, as one event per step and logger: e.g. around all the
        diagnostics of one step. Written even if the block raises."""
        if self.pending is not None:  # nested: the outer block writes
            yield self
            return
        self.pending = {}
        try:
            yield self
        finally:
            pending, self.pending = self.pending, None
            for step, (metrics, hists) in pending.items():
                if metrics or hists:
                    self.emit(metrics, hists, step)
            if self.waiting is not None:  # a watched step's tags are written
                self.charts(self.waiting)

    def emit(self, metrics: dict, hists: dict, step: int) -> None:
        """Host values to every logger: one Summary event per TensorBoard writer and run."""
        runs = None
        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger):
                values = metrics | (wandb_histograms(hists) if isinstance(logger, WandbLogger) else {})
                if values:
                    logger.log_metrics(values, step=step)
                continue
            writer = logger.experiment
            if isinstance(writer, SummaryWriter) and writer.file_writer is not None:  # open
                if runs is None:
                    runs = self.by_run(metrics, hists)
                files = EventFiles.of(writer)
                for name, values in runs.items():
                    events = files.get(name)
                    if events is not None:
                        events.write_values(values, step)
                    else:  # without crc32c, the run itself: through the logger's SummaryWriter
                        writer.file_writer.add_summary(Summary(value=[v for _, v in values]), step)
            else:  # closed (its own calls open it again, in a new file), tensorboardX's, another rank's stand-in: flat tags
                for tag, v in metrics.items():
                    writer.add_scalar(tag, v, step)
                for tag, h in hists.items():
                    writer.add_histogram_raw(tag, h.min, h.max, h.num, h.sum, h.sum_squares,
                                             list(h.bucket_limit), list(h.bucket), step)

    def flush(self) -> None:
        """What torch's SummaryWriters still hold (figures, text; every event without `crc32c`) to disk: they
        write on a thread of their own, and a killed process loses what is queued there. For a caller that
        saves a checkpoint: called first, a run resumed from it has every event logged before its step."""
        if self.waiting is not None:
            self.charts(self.waiting)
        for writer in self.tensorboards():
            writer.flush()

    def by_run(self, metrics: dict, hists: dict) -> dict:
        """{subrun ("": the run itself): [(flat tag, Summary.Value under the tag there), ...]}."""
        runs = {}
        for tag, v in metrics.items():
            name, own = self.routes.get(tag) or ("", tag)
            runs.setdefault(name, []).append((tag, Summary.Value(tag=own, simple_value=v)))
        for tag, h in hists.items():
            name, own = self.routes.get(tag) or ("", tag)
            runs.setdefault(name, []).append((tag, Summary.Value(tag=own, histo=h)))
        return runs

    def figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib figure, drawn once (Agg) and sent as that image to every logger that shows images:
        the caller may redraw the Figure afterwards."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        loggers = [logger for logger in self.loggers if isinstance(logger, (TensorBoardLogger, WandbLogger, MLFlowLogger))]
        if not loggers:
            return
        canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
        canvas.draw()
        image = Image.fromarray(numpy.asarray(canvas.buffer_rgba())[..., :3])  # a copy, without the (opaque) alpha
        encoded = io.BytesIO()  # PNG at zlib level 1: half the time of add_image's level 6, 5-15% larger
        image.save(encoded, format="PNG", compress_level=1)
        png = Summary.Image(height=image.height, width=image.width, colorspace=3, encoded_image_string=encoded.getvalue())
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                if writer.file_writer is not None:  # open
                    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=png)]), step)
            elif isinstance(logger, WandbLogger):
                logger.log_image(tag, [image], step=step)
            else:  # MLflow: an artifact per step, it has no images by step
                logger.experiment.log_image(logger.run_id, image, f"{tag}/step_{step:08d}.png")

    def charts(self, layout: dict, wait: bool = False) -> None:
        """TensorBoard's custom-scalars layout: {category: {chart title: [tag regex, ...]}}, written once.

        A regex may be written for the flat tags, as the README shows them (`dead/.*` for dead/layer1), but a
        layer's series are tags of its own run without that suffix (`dead` of <run>/layer1), which it would
        not match: a chart then also gets those tags (`dead$`), said in the log. With `wait` (a run's start,
        no tag written yet) the layout waits for the tags of the first watched step: it is written when
        that step's batch() ends, at a write of a later step, or at flush()."""
        if wait and not self.routes:
            self.waiting = layout
            return
        self.waiting = None
        layout = {category: {title: ["Multiline", list(tags) + self.in_layer_runs(title, tags)] for title, tags in charts.items()}
                  for category, charts in layout.items() if charts}
        if layout:
            for writer in self.tensorboards():
                writer.add_custom_scalars(layout)

    def in_layer_runs(self, title: str, regexes: list) -> list:
        """Regexes for the layers' own tags whose flat tags `regexes` match (re.match, as TensorBoard) and they don't."""
        try:
            compiled = [re.compile(regex) for regex in regexes]
        except re.error as e:
            raise ValueError(f"custom chart {title!r}: {regexes} holds a bad regular expression ({e})") from e

        def shown(tag):
            return any(regex.match(tag) for regex in compiled)

        moved = {flat: route for flat, route in self.routes.items() if route and shown(flat) and not shown(route[1])}
        added = sorted({re.escape(tag) + "$" for _, tag in moved.values()})
        if added:
            flat, (run, tag) = next(iter(moved.items()))
            log.info("custom chart %r: %s matches the flat tags %s; TensorBoard shows each as a tag of its layer's run "
                     "(%s is %s of <run>/%s), so the chart also matches %s", title, " ".join(regexes),
                     ", ".join(sorted(moved)), flat, tag, run, " ".join(added))
        return added

    def text(self, tag: str, text: str, step: int) -> None:
        for writer in self.tensorboards():
            writer.add_text(tag, text, step)


class EventFiles:
    """The EventFiles of one open torch SummaryWriter (a TensorBoard logger's): in its dir and in its
    subruns', made on first use. Kept on that SummaryWriter (`actgrad_files`), they are its run's own
    and live as long as it does; on a resumed run, every subrun's file starts with the run's purge marker."""

    def __init__(self, writer):
        self.logdir = writer.get_logdir()
        self.purge = purge_step(writer)
        self.files = {}  # {subrun ("": the writer's own dir): EventFile}
        if self.purge is not None:  # resumed: every subrun drops the killed attempt's steps, written to now or not
            for path in subruns(self.logdir):  # from earlier attempts
                self.get(path.name)

    @classmethod
    def of(cls, writer) -> "EventFiles":
        if not hasattr(writer, "actgrad_files"):  # its first write in this run
            writer.actgrad_files = cls(writer)
        return writer.actgrad_files

    def get(self, subrun: str) -> "EventFile | None":
        """The EventFile of the writer's dir ("") or of a subrun; None for its own dir without `crc32c`
        (the SummaryWriter writes there)."""
        if crc32c is None and not subrun:
            return None
        if subrun not in self.files:
            self.files[subrun] = self.open(subrun)
        return self.files[subrun]

    def open(self, subrun: str) -> "EventFile":
        if not subrun:
            return EventFile(os.path.join(self.logdir, file_name(self.logdir)))
        if crc32c is None:
            return EventFile("", self.purge, FileWriter(os.path.join(self.logdir, subrun)))
        # named after the logger's file: read in its order
        return EventFile(os.path.join(self.logdir, subrun, file_name(self.logdir)), self.purge)


class EventFile:
    """An event file of our own beside a SummaryWriter's, in its dir or a subrun's: TensorBoard's record
    format (length, masked CRC-32C of the length, the serialized Event, masked CRC-32C of it), written
    and flushed at each event, so a reader (or a killed run) always has every event written so far."""

    def __init__(self, path: str, purge_step: int | None = None, file_writer=None):
        self.file_writer = file_writer  # without crc32c: a torch FileWriter of the subrun writes instead
        self.described = set()  # tags whose first value here named their flat tag
        if file_writer is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.path = path
            self.file = open(path, "ab")
            self.write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:  # what torch's SummaryWriter writes for purge_step: TensorBoard drops steps >= it
            self.write(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def write_values(self, values: list, step: int) -> None:
        """[(flat tag, Summary.Value)] as one event. A subrun's tag names its flat tag at its first value
        here, in the value's metadata (SUBRUN_PLUGIN): TensorBoard keeps a tag's first metadata."""
        for flat, value in values:
            if flat != value.tag and value.tag not in self.described:
                value.metadata.plugin_data.plugin_name = SUBRUN_PLUGIN
                value.metadata.plugin_data.content = flat.encode()
                self.described.add(value.tag)
        self.write(Event(wall_time=time.time(), step=int(step), summary=Summary(value=[v for _, v in values])))

    def write(self, event: Event) -> None:
        if self.file_writer is not None:
            self.file_writer.add_event(event, walltime=event.wall_time)
            self.file_writer.flush()  # nobody closes it
            return
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self.file.write(b"".join((header, struct.pack("<I", masked_crc(header)), data, struct.pack("<I", masked_crc(data)))))
        self.file.flush()


def subrun(tag: str, layers) -> tuple[str, str] | None:
    """Where TensorBoard shows a layer's series: ("layer1", "act/saturation") for act/saturation/layer1,
    ("layer1", "update_ratio/weight") for update_ratio/layer1.weight, if layer1 is in `layers`; None
    (the run itself) for a tag whose last part names no layer (update_ratio/guide)."""
    quantity, _, where = tag.rpartition("/")
    layer, _, param = where.partition(".")
    if not quantity or layer not in layers:
        return None
    return layer, f"{quantity}/{param}" if param else quantity


def purge_step(writer) -> int | None:
    """The step of the purge marker that torch's SummaryWriter wrote at the start of its first file (for
    purge_step: a resumed run), or None. Read from the newest file of this process that has one: Lightning
    closes the writer when fit ends, and a write after that (a run's end) opens another file, without it;
    an earlier attempt in this process may have left files with a marker of its own."""
    writer.flush()  # torch writes on a thread of its own
    for name in reversed(torch_files(writer.get_logdir())):
        for event in islice(EventFileLoader(os.path.join(writer.get_logdir(), name)).Load(), 3):  # file version, marker's two
            if event.session_log.status == SessionLog.START:
                return event.step
    return None


def torch_files(logdir: str) -> list[str]:
    """The names of the files that torch's SummaryWriter made in logdir from this process
    (events.out.tfevents.<time>.<host>.<pid>.<n>), oldest first."""
    host, pid, found = socket.gethostname(), str(os.getpid()), []
    for name in os.listdir(logdir):
        parts = name.split(".")
        if name.startswith("events.out.tfevents.") and name.endswith(f".{host}.{pid}.{parts[-1]}") and parts[-1].isdigit():
            found.append(((parts[3], int(parts[-1])), name))
    return [name for _, name in sorted(found)]


def torch_file(logdir: str) -> str | None:
    """The name of the file that torch's SummaryWriter made last in logdir from this process, or None."""
    names = torch_files(logdir)
    return names[-1] if names else None


def file_name(logdir: str) -> str:
    """torch_file(logdir) plus ".actgrad": TensorBoard reads a run's files in the order of their names,
    so this one comes right after that writer's (and its purge marker), before any later attempt's.
    Without such a file: one named as torch would, at this time."""
    name = torch_file(logdir)
    host, pid = socket.gethostname(), os.getpid()
    return f"{name}.actgrad" if name else f"events.out.tfevents.{int(time.time()):010d}.{host}.{pid}.actgrad"


def wandb_histograms(hists: dict) -> dict:
    """{tag: wandb.Histogram} of histogram_proto's protos: their buckets as they are, no data again."""
    if not hists:
        return {}
    import wandb  # installed: a WandbLogger exists

    return {tag: wandb.Histogram(np_histogram=(list(h.bucket)[1:], list(h.bucket_limit))) for tag, h in hists.items()}


def masked_crc(data: bytes) -> int:
    """TensorBoard's record checksum: CRC-32C, rotated right by 15 bits, plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def histogram_row(tensor: torch.Tensor) -> tuple:
    """(min, max, sum, sum of squares, counts in BUCKETS equal buckets over [min, max]) of a non-empty
    tensor, as tensors on its device, without a transfer; float32 (float64 for float64 input).

    A value x goes to bucket floor((x - min) / ((max - min) / BUCKETS)), the maximum to the last; a
    constant tensor's (0 / 0) to some bucket: histogram_proto gives it one of its own. With NaN or inf
    inside, the statistics are not finite and the counts meaningless, but every index is in range."""
    x = tensor.detach().reshape(-1)
    if not x.is_floating_point() or x.element_size() < 4:
        x = x.float()
    lo, hi = torch.aminmax(x)
    index = (x - lo).div_((hi - lo) / BUCKETS).int().clamp_(0, BUCKETS - 1)  # NaN's int is clamped too
    return lo, hi, x.sum(), torch.dot(x, x), torch.bincount(index, minlength=BUCKETS)


def to_host(scalars: list, rows: list) -> tuple[list, list]:
    """Numbers and one-element tensors -> floats; histogram_row tuples -> lists of 4 + BUCKETS floats.
    One transfer per device (one in all, when everything is on one device), in float64: counts are exact."""
    floats = [v if isinstance(v, torch.Tensor) else float(v) for v in scalars]
    lists = [None] * len(rows)
    by_device = {}
    for i, v in enumerate(scalars):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, ([], []))[0].append(i)
    for i, row in enumerate(rows):
        by_device.setdefault(row[0].device, ([], []))[1].append(i)
    for scalar_at, row_at in by_device.values():
        values = [scalars[i].detach().reshape(()) for i in scalar_at] + [v for i in row_at for v in rows[i][:4]]
        host = torch.cat([torch.stack(values).double()] + [rows[i][4] for i in row_at]).tolist()  # counts: to float64
        for k, i in enumerate(scalar_at):
            floats[i] = host[k]
        stats, counts = len(scalar_at), len(scalar_at) + 4 * len(row_at)
        for k, i in enumerate(row_at):
            lists[i] = host[stats + 4 * k: stats + 4 * k + 4] + host[counts + BUCKETS * k: counts + BUCKETS * (k + 1)]
    return floats, lists


def histogram_proto(row: list) -> HistogramProto:
    """A HistogramProto from histogram_row's values on the host, in torch's own layout: bucket_limit
    holds right edges, so an empty first bucket ends at the minimum."""
    lo, hi, total, squares, counts = row[0], row[1], row[2], row[3], row[4:]
    n = round(sum(counts))
    if hi > lo:
        limits = [lo + (hi - lo) * i / BUCKETS for i in range(BUCKETS)] + [hi]
    else:  # every value the same: one bucket around it
        limits, counts = [lo - 0.5, lo + 0.5], [n]
    return HistogramProto(min=lo, max=hi, num=n, sum=total, sum_squares=squares,
                          bucket_limit=limits, bucket=[0.0, *counts])
