"""The one place that reads a run's event files back, with TensorBoard's own EventAccumulator:
what scripts/report.py, the tests and anyone comparing runs see (it honours the purge markers
a resumed run writes, as the TensorBoard server does).

A run's per-layer series live in subruns (see actgrad.writer: tag act/saturation of the
subdirectory layer1); `read` gives them back under their flat tags (act/saturation/layer1), which
the first value of each such tag names in its metadata."""

import logging
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its INFO lines about file paths are noise in a run's log

EVERYTHING = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0, "compressedHistograms": 0, "audio": 0}
SUBRUN_PLUGIN = "actgrad_flat_tag"  # a subrun tag's metadata: its plugin content is the flat tag


class Run:
    """A run dir's events, its subruns' under their flat tags: EventAccumulator's Tags, Scalars and
    Histograms over all of them; everything else (Images, Tensors, ...) is the run's own."""

    def __init__(self, run_dir):
        self.main = accumulate(run_dir)
        self.series = {}  # {flat tag: (the subrun's EventAccumulator, its tag there)}
        for sub in subruns(run_dir):
            events = accumulate(sub)
            for tag, flat in flat_tags(events).items():
                self.series[flat] = (events, tag)

    def Tags(self) -> dict:
        tags = {kind: list(v) if isinstance(v, list) else v for kind, v in self.main.Tags().items()}
        for flat, (events, tag) in self.series.items():
            kind = "scalars" if tag in events.Tags()["scalars"] else "histograms"
            tags[kind].append(flat)
        return tags

    def Scalars(self, tag):
        events, own = self.series.get(tag, (self.main, tag))
        return events.Scalars(own)

    def Histograms(self, tag):
        events, own = self.series.get(tag, (self.main, tag))
        return events.Histograms(own)

    def __getattr__(self, name):
        return getattr(self.main, name)


def accumulate(path) -> EventAccumulator:
    """Every event of one dir's event files, nothing sampled away."""
    events = EventAccumulator(str(path), size_guidance=EVERYTHING)
    events.Reload()
    return events


def subruns(run_dir) -> list[Path]:
    """The subdirectories of a run dir that hold event files."""
    return sorted({p.parent for p in Path(run_dir).glob("*/events.out.tfevents.*")})


def flat_tags(events: EventAccumulator) -> dict:
    """{tag: flat tag} of a subrun's tags that name one."""
    try:
        return {tag: content.decode() for tag, content in events.PluginTagToContent(SUBRUN_PLUGIN).items()}
    except KeyError:  # none here
        return {}


def read(run_dir) -> Run:
    """Every event of a run dir (all its event files, its subruns' too), nothing sampled away."""
    return Run(run_dir)


def scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} of every scalar series."""
    events = read(run_dir)
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def steps(run_dir) -> dict:
    """{("histogram" | "image", tag): [step, ...]} of the histograms and images."""
    events = read(run_dir)
    tags = events.Tags()
    return {("histogram", t): [e.step for e in events.Histograms(t)] for t in tags["histograms"]} | {
        ("image", t): [e.step for e in events.Images(t)] for t in tags["images"]}
