"""actgrad.writer's output read back with TensorBoard's own readers, against independent computations:
scalar values, histogram statistics and buckets (numpy.histogram over the same values), one event
per write (per step inside batch()), tensors holding NaN or inf, a resumed run's purge, the checksums,
what a process killed after a flush leaves."""

import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

import actgrad.writer as writer_module
from actgrad.writer import BUCKETS, Writer

torch.set_num_threads(1)
ALL_SIZES = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0, "compressedHistograms": 0, "audio": 0}


class Metrics:
    """A logger that is not TensorBoard: it gets the scalars."""

    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def tensorboard(path, **kwargs):
    return TensorBoardLogger(save_dir=str(path), name="", version="", **kwargs)


def read(path):
    events = EventAccumulator(str(path), size_guidance=ALL_SIZES)
    events.Reload()
    return events


def summaries(path):
    """[(step, [tag, ...])] of every event with a summary, file by file in the order TensorBoard reads them."""
    found = []
    for file in sorted(p for p in Path(path).iterdir() if "tfevents" in p.name):
        for event in LegacyEventFileLoader(str(file)).Load():
            if event.HasField("summary"):
                found.append((event.step, [v.tag for v in event.summary.value]))
    return found


def histogram(events, tag, step):
    return {e.step: e.histogram_value for e in events.Histograms(tag)}[step]


def check_histogram(h, values: np.ndarray):
    """A histogram against numpy over the same values (float64): statistics, edges and counts."""
    lo, hi = values.min(), values.max()
    assert h.num == len(values)
    assert h.min == lo and h.max == hi  # exact: the tensor's own values
    scale = np.abs(values).sum()
    assert h.sum == pytest.approx(values.sum(), abs=1e-6 * scale + 1e-12)
    assert h.sum_squares == pytest.approx((values**2).sum(), rel=1e-5)
    # torch's layout: right edges, an empty first bucket ending at the minimum
    assert len(h.bucket_limit) == len(h.bucket) == BUCKETS + 1 and h.bucket[0] == 0
    counts, edges = np.histogram(values, bins=BUCKETS, range=(lo, hi))
    assert h.bucket_limit == pytest.approx(edges.tolist(), rel=1e-12, abs=1e-12 * (hi - lo))
    ours = np.array(h.bucket[1:])
    assert ours.sum() == len(values)
    # a value within rounding of a bucket edge may land on either side of it: each such value moves one count
    position = (values - lo) / (hi - lo) * BUCKETS
    on_edge = ((np.abs(position - np.round(position)) < 1e-4) & (position > 0.5) & (position < BUCKETS - 0.5)).sum()
    assert np.abs(ours - counts).sum() <= 2 * on_edge, (ours, counts)


# ---------------------------------------------------------------- scalars


def test_scalars_read_back(tmp_path):
    logger, other = tensorboard(tmp_path), Metrics()
    writer = Writer([logger, other])
    values = {"a/zero_d": torch.tensor(0.125), "a/one_element": torch.tensor([2.5]), "a/float": math.pi,
              "a/int": 7, "a/float64": torch.tensor(1 / 3, dtype=torch.float64), "a/nan": torch.tensor(float("nan"))}
    written = writer.scalars(values, 12)
    assert set(written) == set(values) and all(isinstance(v, float) for v in written.values())
    assert written["a/zero_d"] == 0.125 and written["a/one_element"] == 2.5 and written["a/int"] == 7.0
    assert math.isnan(written["a/nan"])
    assert other.logged == [(12, written)]
    events = read(tmp_path)
    for tag, value in written.items():
        (point,) = events.Scalars(tag)
        assert point.step == 12
        assert point.value == pytest.approx(value, rel=1e-7) or (math.isnan(point.value) and math.isnan(value))
    assert summaries(tmp_path) == [(12, list(values))]  # one event, every value in it
    assert writer.scalars({}, 13) == {} and summaries(tmp_path) == [(12, list(values))]  # nothing: no event


# ---------------------------------------------------------------- histograms


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "normal": torch.randn(32, 200, generator=g),
        "heavy_tailed": torch.randn(30, 200, generator=g) ** 3 * 1e-3,
        "shifted": torch.randn(27, 10, generator=g) * 1e-3 + 5,  # far from 0: min/max/buckets in its own range
        "small": torch.tensor([0.5, -1.0, 2.0, 2.0, 0.0]),
        "integers": torch.randint(-3, 9, (500,), generator=g),
        "float64": torch.randn(200, 27, generator=g, dtype=torch.float64),
        "half": torch.randn(100, generator=g).half(),
    }


def test_histograms_against_numpy(tmp_path):
    writer = Writer([tensorboard(tmp_path)])
    writer.histograms(tensors(), 3)
    events = read(tmp_path)
    assert set(events.Tags()["histograms"]) == set(tensors())
    for tag, tensor in tensors().items():
        check_histogram(histogram(events, tag, 3), tensor.double().flatten().numpy())
    assert summaries(tmp_path) == [(3, list(tensors()))]  # every histogram of the call in one event
    assert not events.Tags()["scalars"]  # nothing non-finite: no <tag>/nonfinite


def test_every_step_of_a_series(tmp_path):
    writer = Writer([tensorboard(tmp_path)])
    g = torch.Generator().manual_seed(1)
    steps = {step: torch.randn(64, generator=g) * (step + 1) for step in range(5)}
    for step, tensor in steps.items():
        writer.write({"loss": tensor.mean()}, {"h": tensor}, step)
    events = read(tmp_path)
    assert [e.step for e in events.Histograms("h")] == list(steps) == [e.step for e in events.Scalars("loss")]
    for step, tensor in steps.items():
        check_histogram(histogram(events, "h", step), tensor.double().numpy())
    assert summaries(tmp_path) == [(step, ["loss", "h"]) for step in steps]


def test_constant_tensor(tmp_path):
    Writer([tensorboard(tmp_path)]).histograms({"c": torch.full((10, 3), 0.25)}, 0)
    h = histogram(read(tmp_path), "c", 0)
    assert (h.min, h.max, h.num, h.sum, h.sum_squares) == (0.25, 0.25, 30, 7.5, 1.875)
    assert list(h.bucket_limit) == [-0.25, 0.75] and list(h.bucket) == [0, 30]  # one bucket around the value


def test_empty_tensor_writes_nothing(tmp_path):
    writer = Writer([tensorboard(tmp_path)])
    writer.histograms({"empty": torch.zeros(0)}, 0)
    assert summaries(tmp_path) == []


# ---------------------------------------------------------------- bad input


def test_nonfinite_values_are_left_out_and_counted(tmp_path):
    logger, other = tensorboard(tmp_path), Metrics()
    clean = torch.randn(100, generator=torch.Generator().manual_seed(2))
    bad = clean.clone()
    bad[[3, 50, 51]] = float("nan")
    bad[7], bad[8], bad[90] = float("inf"), float("-inf"), float("inf")
    huge = torch.tensor([3e30, -1e25, 1.0])  # finite, but its squares pass float32's range
    written = Writer([logger, other]).write({"s": torch.tensor(1.0)}, {"clean": clean, "bad": bad, "all_nan": torch.full((4,), float("nan")),
                                                                      "huge": huge}, 5)
    assert written == {"s": 1.0, "bad/nonfinite": 6.0, "all_nan/nonfinite": 4.0}
    assert other.logged == [(5, written)]
    events = read(tmp_path)
    assert set(events.Tags()["histograms"]) == {"clean", "bad", "huge"}  # all NaN: nothing to draw
    finite = bad[torch.isfinite(bad)].double().numpy()
    assert len(finite) == 94
    check_histogram(histogram(events, "bad", 5), finite)
    check_histogram(histogram(events, "clean", 5), clean.double().numpy())
    h = histogram(events, "huge", 5)
    assert h.sum_squares == pytest.approx(9e60 + 1e50 + 1, rel=1e-6) and h.num == 3
    assert {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]} == {
        "s": [(5, 1.0)], "bad/nonfinite": [(5, 6.0)], "all_nan/nonfinite": [(5, 4.0)]}


def test_nonfinite_without_tensorboard():
    other = Metrics()
    written = Writer([other]).histograms({"h": torch.tensor([1.0, float("nan")])}, 2)
    assert written is None and other.logged == [(2, {"h/nonfinite": 1.0})]


# ---------------------------------------------------------------- one event per step


def test_batch_writes_one_event_per_step(tmp_path):
    writer = Writer([tensorboard(tmp_path)])
    x = torch.randn(50, generator=torch.Generator().manual_seed(3))
    with writer.batch():
        assert writer.scalars({"a": x.mean()}, 4) == {"a": pytest.approx(float(x.mean()))}  # floats at once
        writer.histograms({"h": x}, 4)
        writer.scalars({"b": x.std()}, 4)
        writer.scalars({"c": 1.0}, 5)
        assert summaries(tmp_path) == []  # written when the block ends
    assert summaries(tmp_path) == [(4, ["a", "b", "h"]), (5, ["c"])]
    check_histogram(histogram(read(tmp_path), "h", 4), x.double().numpy())


def test_batch_writes_even_if_the_block_raises(tmp_path):
    writer = Writer([tensorboard(tmp_path)])
    with pytest.raises(RuntimeError), writer.batch():
        writer.scalars({"a": 1.0}, 0)
        raise RuntimeError("diverged")
    assert summaries(tmp_path) == [(0, ["a"])]
    writer.scalars({"b": 2.0}, 1)  # and the writer writes at once again
    assert summaries(tmp_path) == [(0, ["a"]), (1, ["b"])]


# ---------------------------------------------------------------- the event file


def test_a_resumed_run_purges_what_the_killed_attempt_wrote_past_its_checkpoint(tmp_path):
    first = Writer([tensorboard(tmp_path)])
    for step in range(10):
        first.write({"loss": float(step)}, {"h": torch.arange(3.0) + step}, step)
    time.sleep(1.01 - time.time() % 1)  # another second: the attempts' files sort by time, as a resumed process's do
    second = Writer([tensorboard(tmp_path, purge_step=6)])  # resumed from step 6, as actgrad.experiment does
    for step in range(6, 8):
        second.write({"loss": 100.0 + step}, {"h": torch.arange(3.0) - step}, step)
    second.loggers[0].experiment.flush()
    events = read(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, float(s)) for s in range(6)] + [(6, 106.0), (7, 107.0)]
    assert [(e.step, e.histogram_value.min) for e in events.Histograms("h")] == [(s, s) for s in range(6)] + [(6, -6), (7, -7)]


def test_event_file_sorts_after_the_loggers_and_its_checksums_are_tensorboards(tmp_path):
    logger = tensorboard(tmp_path)
    Writer([logger]).write({"a": 1.0}, {"h": torch.randn(100)}, 0)
    logger.experiment.add_text("t", "text goes through the SummaryWriter", 0)
    logger.experiment.flush()
    names = sorted(p.name for p in tmp_path.iterdir() if "tfevents" in p.name)
    assert len(names) == 2 and names[1] == names[0] + ".actgrad"
    data = (tmp_path / names[1]).read_bytes()
    records = 0
    while data:  # length, masked CRC-32C of the length, the event, masked CRC-32C of the event
        header, (header_crc,) = data[:8], struct.unpack("<I", data[8:12])
        (length,) = struct.unpack("<Q", header)
        event, (event_crc,) = data[12:12 + length], struct.unpack("<I", data[12 + length:16 + length])
        assert header_crc == masked_crc32c(header) and event_crc == masked_crc32c(event)  # TensorBoard's own checksum
        data, records = data[16 + length:], records + 1
    assert records == 2  # the file version, then the one event


def test_without_crc32c_events_go_through_the_summary_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "crc32c", None)
    logger = tensorboard(tmp_path)
    x = torch.randn(200, generator=torch.Generator().manual_seed(4))
    Writer([logger]).write({"a": 0.5}, {"h": x}, 1)
    logger.experiment.flush()
    assert [p.name for p in tmp_path.iterdir() if "tfevents" in p.name and p.name.endswith(".actgrad")] == []
    events = read(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("a")] == [(1, 0.5)]
    check_histogram(histogram(events, "h", 1), x.double().numpy())


def test_a_closed_writer_is_opened_again(tmp_path):
    """After the logger is finalized, writes still land (the SummaryWriter's own calls reopen it), as before."""
    logger = tensorboard(tmp_path)
    writer = Writer([logger])
    writer.scalars({"a": 1.0}, 0)
    logger.finalize("success")
    writer.write({"b": 2.0}, {"h": torch.arange(4.0)}, 1)
    assert logger.experiment.file_writer is not None
    logger.experiment.flush()
    events = read(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("b")] == [(1, 2.0)]
    assert histogram(events, "h", 1).num == 4


# ---------------------------------------------------------------- per-layer series: a TensorBoard run each

LAYERS = {"embedding", "layer1", "layer2", "output"}


def subrun_tags(path):
    """{subrun: (scalar tags, histogram tags)} as TensorBoard reads each subdirectory: a run of its own."""
    return {sub.name: (set(read(sub).Tags()["scalars"]), set(read(sub).Tags()["histograms"]))
            for sub in sorted(Path(path).iterdir()) if sub.is_dir()}


def test_per_layer_series_go_to_a_subrun_each_under_their_quantity(tmp_path):
    logger, other = tensorboard(tmp_path), Metrics()
    writer = Writer([logger, other])
    x = torch.randn(40, generator=torch.Generator().manual_seed(5))
    scalars = {"act/saturation/layer1": 0.25, "act/saturation/layer2": 0.5, "update_ratio/layer1.weight": -3.1,
               "update_ratio/embedding.weight": -2.5, "update_ratio/output.weight": -3.4, "update_ratio/guide": -3.0}
    writer.write(scalars, {"act/layer1": x, "param_grad/layer2.weight": x * 2}, 7, layers=LAYERS)
    writer.scalars({"train/loss": 3.3, "final/saturation/layer1": 0.25}, 7)  # no layers given: the run itself
    assert subrun_tags(tmp_path) == {
        "embedding": ({"update_ratio/weight"}, set()),
        "layer1": ({"act/saturation", "update_ratio/weight"}, {"act"}),
        "layer2": ({"act/saturation"}, {"param_grad/weight"}),
        "output": ({"update_ratio/weight"}, set())}
    own = read(tmp_path)
    assert set(own.Tags()["scalars"]) == {"update_ratio/guide", "train/loss", "final/saturation/layer1"}
    assert not own.Tags()["histograms"]
    assert [(e.step, e.value) for e in read(tmp_path / "layer2").Scalars("act/saturation")] == [(7, 0.5)]
    assert other.logged == [(7, scalars), (7, {"train/loss": 3.3, "final/saturation/layer1": 0.25})]  # flat tags

    from actgrad import events  # the project's reader: the flat tags again

    flat = events.read(tmp_path)
    assert set(flat.Tags()["scalars"]) == set(scalars) | {"train/loss", "final/saturation/layer1"}
    assert set(flat.Tags()["histograms"]) == {"act/layer1", "param_grad/layer2.weight"}
    assert events.scalars(tmp_path)["update_ratio/layer1.weight"] == [(7, pytest.approx(-3.1))]
    check_histogram(histogram(flat, "param_grad/layer2.weight", 7), (x * 2).double().numpy())


def test_subrun_files_sort_after_the_loggers_and_name_each_flat_tag_once(tmp_path):
    logger = tensorboard(tmp_path)
    for step in range(3):  # a Writer each time, as Writer.of(trainer) in a callback: the logger's files all the same
        Writer([logger]).scalars({"act/std/layer1": 1.0 + step}, step, layers={"layer1"})
    (torch_file,) = [p.name for p in tmp_path.iterdir() if p.name.startswith("events") and not p.name.endswith(".actgrad")]
    assert [p.name for p in (tmp_path / "layer1").iterdir()] == [torch_file + ".actgrad"]
    named = [[v.metadata.plugin_data.content for v in event.summary.value]
             for event in LegacyEventFileLoader(str(tmp_path / "layer1" / (torch_file + ".actgrad"))).Load()
             if event.HasField("summary")]
    assert named == [[b"act/std/layer1"], [b""], [b""]]  # the first value only: TensorBoard keeps the first


def test_a_resumed_runs_subruns_drop_what_the_killed_attempt_wrote_past_its_checkpoint(tmp_path):
    first = Writer([tensorboard(tmp_path)])
    for step in range(10):
        first.write({"act/std/layer1": float(step), "act/std/layer2": float(step)}, {"act/layer1": torch.arange(3.0) + step},
                    step, layers={"layer1", "layer2"})
    time.sleep(1.01 - time.time() % 1)  # another second: the attempts' files sort by time, as a resumed process's do
    second = Writer([tensorboard(tmp_path, purge_step=6)])  # resumed from step 6, as actgrad.experiment does
    for step in range(6, 8):  # layer2 is not written again: its subrun drops steps 6-9 all the same
        second.write({"act/std/layer1": 100.0 + step}, {"act/layer1": torch.arange(3.0) - step}, step, layers={"layer1"})
    layer1, layer2 = read(tmp_path / "layer1"), read(tmp_path / "layer2")
    assert [(e.step, e.value) for e in layer1.Scalars("act/std")] == [(s, float(s)) for s in range(6)] + [(6, 106.0), (7, 107.0)]
    assert [(e.step, e.histogram_value.min) for e in layer1.Histograms("act")] == [(s, s) for s in range(6)] + [(6, -6), (7, -7)]
    assert [e.step for e in layer2.Scalars("act/std")] == list(range(6))

    from actgrad import events

    assert [s for s, _ in events.scalars(tmp_path)["act/std/layer2"]] == list(range(6))


def test_without_crc32c_subruns_go_through_a_file_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "crc32c", None)
    logger = tensorboard(tmp_path)
    Writer([logger]).write({"act/std/layer1": 0.5, "train/loss": 3.0}, {}, 2, layers={"layer1"})
    logger.experiment.flush()
    from actgrad import events

    assert events.scalars(tmp_path) == {"act/std/layer1": [(2, 0.5)], "train/loss": [(2, 3.0)]}
    assert [(e.step, e.value) for e in read(tmp_path / "layer1").Scalars("act/std")] == [(2, 0.5)]


def test_a_resumed_runs_end_written_after_fit_is_not_purged_again(tmp_path):
    """Lightning closes the logger's writer when fit ends; what is written after that (a run's end) lands
    without a second purge marker: the resumed attempt's own steps from the purge step on stay."""
    Writer([tensorboard(tmp_path)]).write({"loss": -1.0, "act/std/layer1": -1.0}, {}, 8, layers={"layer1"})  # killed past 6
    time.sleep(1.01 - time.time() % 1)
    logger = tensorboard(tmp_path, purge_step=6)
    writer = Writer([logger])
    for step in range(6, 8):
        writer.write({"loss": float(step), "act/std/layer1": float(step)}, {}, step, layers={"layer1"})
    logger.finalize("success")
    writer.write({"loss": 8.0}, {}, 8)  # opens the logger's writer again, in a new file
    Writer([logger]).write({"act/std/layer1": 8.0}, {}, 8, layers={"layer1"})
    writer.flush()
    from actgrad import events

    logged = events.scalars(tmp_path)
    assert logged["loss"] == logged["act/std/layer1"] == [(6, 6.0), (7, 7.0), (8, 8.0)]


def test_a_flush_leaves_every_event_to_a_killed_process(tmp_path):
    """What a run killed after a checkpoint leaves: flush() is for the caller that saves one."""
    script = f"""
import os, signal, torch
from lightning.pytorch.loggers import TensorBoardLogger
from actgrad.writer import Writer
writer = Writer([TensorBoardLogger(save_dir={str(tmp_path)!r}, name="", version="")])
for step in range(50):
    writer.write({{"loss": float(step), "act/std/layer1": float(step)}}, {{"act/layer2": torch.arange(3.0) + step}}, step,
                 layers={{"layer1", "layer2"}})
    writer.text("note", f"step {{step}}", step)
writer.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    from actgrad import events

    run, logged = events.read(tmp_path), events.scalars(tmp_path)
    assert logged["loss"] == logged["act/std/layer1"] == [(s, float(s)) for s in range(50)]
    assert [e.step for e in run.Histograms("act/layer2")] == list(range(50))
    assert [e.step for e in run.Tensors("note/text_summary")] == list(range(50))
