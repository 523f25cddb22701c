"""scripts/report.py on a real sweep: seeds as repeats (mean +- sd, n, the missing runs named), the lecture's
rows first beside its published losses, the pairs of rows the seeds' spread cannot tell apart; and
scripts/sample.py naming the runs inside a folder that is not one. The numbers are checked against
the runs' event files read with TensorBoard's own EventAccumulator and statistics done by hand."""

import itertools
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from actgrad.configurations import configurations

from conftest import ROOT, TINY, census_sample
from test_train import run_cli

sys.path.insert(0, str(ROOT / "scripts"))
from report import main as report_main, report  # noqa: E402
from sample import main as sample  # noqa: E402



@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 inits x 2 norms x 2 seeds, 20 steps each: 8 runs, 4 configurations (3 of them the lecture's rows)."""
    tmp = tmp_path_factory.mktemp("report")
    names = census_sample(tmp / "names.txt")
    steps = [t for t in TINY if not t.startswith(("trainer.max_steps", "val_every"))]
    proc = run_cli("-m", "init=naive,kaiming", "norm=none,batchnorm", "seed=1,2", "trainer.max_steps=20",
                   "val_every_n_steps=10", *steps, f"data.path={names}", f"hydra.sweep.dir={tmp / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "sweep"


def final(run_dir, split):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events.Scalars(f"final/{split}_loss")[-1].value


def by_hand(values):
    """(mean, sample standard deviation), written out."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def table(sweep_dir):
    """{first cell: {column: cell}} of report.md's table, in its order."""
    lines = [line for line in (sweep_dir / "report.md").read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]
    return {row[header[0]]: row for row in rows}


def copy(sweep, tmp_path, name="sweep"):
    shutil.copytree(sweep, tmp_path / name, ignore=shutil.ignore_patterns("checkpoints"))
    return tmp_path / name


def test_seeds_are_one_configuration_with_mean_sd_and_n_from_the_events(sweep, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith((sweep / "report.md").read_text())
    rows = table(sweep)
    assert len(rows) == 4
    for label, row in rows.items():
        init, norm = re.fullmatch(r"init=(\w+),norm=(\w+)", label).groups()
        assert row["n"] == "2" and row["missing"] == "-"
        for split in ("train", "val", "test"):
            mean, sd = by_hand([final(sweep / f"init={init},norm={norm},seed={s}", split) for s in (1, 2)])
            assert row[f"{split} loss"] == f"{mean:.4f} ± {sd:.4f}", (label, split)
    # the lecture's rows first, in its order, beside its published losses; then the others as they came
    assert list(rows)[:3] == ["init=naive,norm=none", "init=kaiming,norm=none", "init=kaiming,norm=batchnorm"]
    assert [(rows[k]["lecture row"], rows[k]["lecture train"], rows[k]["lecture val"]) for k in list(rows)[:3]] == [
        ("original", "2.1245", "2.1682"), ("kaiming init", "2.0377", "2.1070"), ("kaiming + batchnorm", "2.0668", "2.1048")]
    assert {rows[k]["lecture val"] for k in list(rows)[3:]} == {"-"}

    # the parameter count at each run's start: what run.yaml's shapes add up to; the lecture's count beside it with BatchNorm
    for run_dir in sweep.glob("init=*"):
        shapes = yaml.safe_load((run_dir / "run.yaml").read_text())["shapes"]
        count = sum(math.prod(shape) for shape in shapes.values())
        line = next(line for line in (run_dir / "train.log").read_text().splitlines()  # a stack's log is its members'
                    if f"- {run_dir.name}: " in line and " parameters" in line)
        assert line.endswith(f"{run_dir.name}: {count:,} parameters" + (
            " (the lecture's layout keeps a bias before each norm's shift: 12,297)" if "batchnorm" in run_dir.name else ""))
        assert count == (12_097 if "batchnorm" in run_dir.name else 11_897)


def test_pairs_within_the_seeds_spread_are_marked_not_distinguishable(sweep, tmp_path):
    sweep = copy(sweep, tmp_path)
    for seed in (1, 2):  # a configuration whose runs are kaiming's very runs: the same losses, told apart by nothing
        twin = sweep / f"init=scaled,norm=none,seed={seed}"
        shutil.copytree(sweep / f"init=kaiming,norm=none,seed={seed}", twin)
        overrides = yaml.safe_load((twin / ".hydra" / "overrides.yaml").read_text())
        (twin / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            ["init=scaled" if o == "init=kaiming" else o for o in overrides]))
    report(sweep)
    said = (sweep / "report.md").read_text().split("Not distinguishable by val loss")[1].splitlines()[0]

    losses = {label: [final(d, "val") for d in dirs] for label, dirs in configurations(sweep).items()}
    expected = set()
    for a, b in itertools.combinations(losses, 2):
        (ma, sa), (mb, sb) = by_hand(losses[a]), by_hand(losses[b])
        if abs(ma - mb) < 2 * math.sqrt(sa ** 2 / 2 + sb ** 2 / 2):
            expected.add(frozenset((a, b)))
    marked = {frozenset(pair) for pair in re.findall(r"(init=\w+,norm=\w+) and (init=\w+,norm=\w+)", said)}
    assert frozenset(("init=kaiming,norm=none", "init=scaled,norm=none")) in expected
    assert marked == expected


def test_a_failed_job_is_named_and_not_averaged(sweep, tmp_path, capsys, monkeypatch):
    sweep = copy(sweep, tmp_path, "my sweep [1]")
    failed = sweep / "init=kaiming,norm=none,seed=2"
    (failed / "status.yaml").write_text(yaml.safe_dump({"status": "failed", "steps": 10, "error": "RuntimeError: boom"}))
    refused = sweep / "init=naive,norm=batchnorm,seed=3"  # refused before it started: a status, no .hydra record
    refused.mkdir()
    (refused / "status.yaml").write_text(yaml.safe_dump({"status": "failed", "error": "seed=3: bad"}))
    monkeypatch.setattr(sys, "argv", ["report.py", str(sweep)])
    report_main()
    out = capsys.readouterr()
    rows = table(sweep)
    kaiming = rows["init=kaiming,norm=none"]
    assert kaiming["n"] == "1" and kaiming["missing"] == "seed=2: failed (RuntimeError: boom)"
    assert kaiming["val loss"] == f"{final(sweep / 'init=kaiming,norm=none,seed=1', 'val'):.4f}"  # seed 1's alone
    naive = rows["init=naive,norm=batchnorm"]
    assert naive["n"] == "2" and naive["missing"] == "seed=3: failed (seed=3: bad)"
    assert naive["val loss"] == "{:.4f} ± {:.4f}".format(*by_hand(
        [final(sweep / f"init=naive,norm=batchnorm,seed={s}", "val") for s in (1, 2)]))
    assert "Not compared (fewer than 2 completed seeds, no spread to judge by): init=kaiming,norm=none" in out.out
    assert out.out.rstrip().splitlines()[-2:] == [
        f"written into {shlex.quote(str(sweep))}: report.md, report.csv, loss_curves.png, saturation.png",
        f"comparison figures: tensorboard --logdir {shlex.quote(str(sweep / 'compare'))}"]


def test_one_seed_each_is_a_row_per_run(sweep, tmp_path):
    single = tmp_path / "single"
    for run_dir in sweep.glob("*seed=1"):
        shutil.copytree(run_dir, single / run_dir.name, ignore=shutil.ignore_patterns("checkpoints"))
    rows = {row["run"]: row for row in report(single)}
    shown = table(single)
    assert list(shown)[:3] == [f"init={i},norm={n},seed=1" for i, n in
                               (("naive", "none"), ("kaiming", "none"), ("kaiming", "batchnorm"))]
    assert list(next(iter(shown.values()))) == [
        "run", "status", "lecture row", "initial loss", "ln(V)", "train loss", "lecture train", "val loss",
        "lecture val", "test loss", "peak saturation", "final update ratio (log10, weights)"]
    for name, row in shown.items():
        assert row["status"] == "completed" and "±" not in row["val loss"]
        assert row["val loss"] == f"{final(single / name, 'val'):.4f}" == f"{rows[name]['val loss']:.4f}"


def test_sample_names_the_runs_inside_a_folder_that_is_not_one(sweep, tmp_path, capsys):
    dated = tmp_path / "runs" / "2026-01-01_00-00-00"  # a single run with overrides: its dir is inside the dated one
    run_dir = dated / "callbacks=[default,grad_norm],init=naive"
    shutil.copytree(sweep / "init=naive,norm=none,seed=1", run_dir)
    assert sample([str(dated)]) == 1
    said = capsys.readouterr()
    assert said.out == "" and said.err.splitlines() == [f"error: {dated}: not a run dir; the run is inside it: '{run_dir}'"]
    (pasted,) = shlex.split(said.err.split("inside it: ")[1])  # as a shell reads the line back
    assert (Path(pasted) / "checkpoints" / "last.ckpt").is_file()  # what sample.py loads (tests/test_load.py samples)


def test_experiment_lecture_sweeps_the_lectures_five_rows_and_the_other_inits_with_batchnorm(composer):
    from hydra import compose

    cfg = compose(config_name="config", overrides=["experiment=lecture"], return_hydra_config=True)
    params = {key: value.split(",") for key, value in cfg.hydra.sweeper.params.items()}
    assert params == {"init": ["naive", "scaled_output", "scaled", "kaiming"], "norm": ["none", "batchnorm"]}
    from report import LECTURE

    assert all(init in params["init"] and norm in params["norm"] for init, norm, *_ in LECTURE)
