"""The comparison run of a sweep (actgrad.compare): its lines and table against the runs' own events."""

import statistics
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from actgrad import compare, events
from actgrad.configurations import configurations

RUN = ["trainer.max_steps=300", "steps_per_batch=50", "log_every_n_steps=50", "val_every_n_steps=100",
       "checkpoint_every_n_steps=300", "trainer.enable_progress_bar=false", "callbacks.activations.every_n_steps=100",
       "callbacks.histograms.every_n_steps=100", "callbacks.update_ratio.every_n_steps=100"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, small_names_module):
    """Two configurations (naive, kaiming) of two seeds each: one stacked group, a few seconds."""
    out = tmp_path_factory.mktemp("sweep")
    done = subprocess.run([sys.executable, "train.py", "-m", "init=naive,kaiming", "seed=1,2", *RUN,
                           f"data.path={small_names_module}", f"hydra.sweep.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def small_names_module(tmp_path_factory):
    from conftest import census_sample

    return census_sample(tmp_path_factory.mktemp("data") / "names.txt")


def text_of(compare_dir) -> str:
    board = events.accumulate(compare_dir)
    return board.Tensors("Sweep loss table/text_summary")[0].tensor_proto.string_val[0].decode()


def test_the_sweep_writes_its_comparison_with_seeds_as_repeats(sweep):
    out = sweep / "compare"
    board = events.accumulate(out)
    images = board.Tags()["images"]
    assert {"compare/activations", "compare/val_loss", "compare/saturation", "compare/update_ratio"} <= set(images)
    assert all(board.Images(t)[0].width == 1120 for t in images)  # readable at TensorBoard's full card width
    # the table's mean +- sd of each configuration, against the runs' own final values computed here
    table = text_of(out)
    for init in ("naive", "kaiming"):
        finals = [yaml.safe_load((sweep / f"init={init},seed={s}" / "status.yaml").read_text())["final/val_loss"]
                  for s in (1, 2)]
        assert f"| init={init} | 2 |" in table
        assert f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f} |" in table


def test_a_line_is_the_mean_and_spread_of_its_seeds(sweep):
    configs = configurations(sweep)
    assert sorted(configs) == ["init=kaiming", "init=naive"]
    runs = {d: compare.RunEvents(d) for dirs in configs.values() for d in dirs}
    steps, means, spread, n = compare.series_line(configs["init=naive"], runs, "act/saturation/layer1")
    by_seed = [dict(events.scalars(sweep / f"init=naive,seed={s}")["act/saturation/layer1"]) for s in (1, 2)]
    assert n == 2 and steps == [0, 100, 200, 299]
    for step, mean, sd in zip(steps, means, spread):
        a, b = by_seed[0][step], by_seed[1][step]
        assert mean == pytest.approx((a + b) / 2, abs=1e-9)
        assert sd == pytest.approx(abs(a - b) / 2**0.5, abs=1e-9)  # the sample standard deviation of two


def test_a_failed_run_is_named_and_the_others_drawn_and_a_rerun_rewrites(sweep, tmp_path):
    status = sweep / "init=kaiming,seed=2" / "status.yaml"
    kept = status.read_text()
    status.write_text("status: failed\nerror: planted by the test\n")
    try:
        out = compare.compare(sweep)
    finally:
        status.write_text(kept)
    table = text_of(out)
    assert "| init=kaiming | 1 |" in table and "`init=kaiming,seed=2` (failed)" in table
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # rewritten, not appended


def test_a_folder_named_compare_that_is_not_ours_is_left_alone(tmp_path, sweep):
    import shutil

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    shutil.rmtree(copy / "compare")
    (copy / "compare").mkdir()
    (copy / "compare" / "mine.txt").write_text("the user's")
    done = subprocess.run([sys.executable, "-m", "actgrad.compare", str(copy)], capture_output=True, text=True)
    assert done.returncode == 1 and "was not written by actgrad.compare" in done.stderr
    assert [p.name for p in (copy / "compare").iterdir()] == ["mine.txt"]
