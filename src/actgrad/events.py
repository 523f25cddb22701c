"""The one place that reads a run's event files back, with TensorBoard's own EventAccumulator:
what scripts/report.py, the tests and anyone comparing runs see (it honours the purge markers
a resumed run writes, as the TensorBoard server does)."""

import logging
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its INFO lines about file paths are noise in a run's log

EVERYTHING = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0, "compressedHistograms": 0, "audio": 0}


def read(run_dir) -> EventAccumulator:
    """Every event of a run dir (all its event files), nothing sampled away."""
    events = EventAccumulator(str(Path(run_dir)), size_guidance=EVERYTHING)
    events.Reload()
    return events


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
