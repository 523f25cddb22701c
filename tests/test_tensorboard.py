"""What a person sees in TensorBoard, checked through a real `tensorboard` server's HTTP API."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from actgrad.events import scalars, steps

from conftest import ROOT, TINY

ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from conftest import census_sample

    folder = tmp_path_factory.mktemp("tb")
    names = census_sample(folder / "names.txt")
    args = ["-m", "init=naive,kaiming", "norm=none,batchnorm", "optimizer.lr=0.05", *TINY, "callbacks=default",
            "trainer.max_steps=30", f"data.path={names}", "hydra/launcher=local", f"hydra.sweep.dir={folder / 'sweep'}"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return folder / "sweep"


@pytest.fixture(scope="module")
def server(sweep):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--port", str(port),
                             "--bind_all"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if post(port, "/data/plugin/hparams/experiment", {"experimentName": ""}).get("hparamInfos"):
                break
        except OSError:
            pass
        time.sleep(0.5)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def test_hparams_tell_the_sweeps_runs_apart(server):
    experiment = post(server, "/data/plugin/hparams/experiment", {"experimentName": ""})
    columns = {h["name"] for h in experiment["hparamInfos"]}
    assert {"init", "norm", "optimizer", "optimizer.lr", "status"} <= columns
    assert not [c for c in columns if "_target_" in c]
    assert not columns & {"logger", "debug", "callbacks", "trainer"}  # how a run is watched, not what it is
    shown = [h["name"] for h in experiment["hparamInfos"]][:5]  # the columns the HPARAMS tab shows until asked
    assert {"init", "norm"} <= set(shown), shown
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"init/loss", "init/uniform_loss", "final/train_loss", "final/val_loss", "final/test_loss",
            "final/saturation/layer1", "final/diverged_step"} <= metrics
    groups = post(server, "/data/plugin/hparams/session_groups", {
        "experimentName": "", "allowedStatuses": ALL_STATUSES, "colParams": [], "startIndex": 0, "sliceSize": 100})
    rows = {(g["hparams"]["init"], g["hparams"]["norm"]): g for g in groups["sessionGroups"]}
    assert set(rows) == {("naive", "none"), ("naive", "batchnorm"), ("kaiming", "none"), ("kaiming", "batchnorm")}
    for row in rows.values():
        assert set(row["hparams"]) == columns  # every run has every column
        values = {m["name"]["tag"]: m["value"] for m in row["metricValues"]}
        assert {"init/loss", "final/val_loss", "final/saturation/layer1"} <= set(values)
    naive = {m["name"]["tag"]: m["value"] for m in rows[("naive", "none")]["metricValues"]}
    assert naive["init/loss"] > 5 * naive["init/uniform_loss"]  # the lecture's confidently wrong start


def test_final_values_sit_at_the_final_step_and_the_last_step_is_logged(sweep):
    for run in sweep.iterdir():
        if not run.is_dir() or run.name == "compare":  # the sweep's comparison run
            continue
        logged = scalars(run)
        for tag in ("final/val_loss", "final/train_loss", "final/steps", "test/loss"):
            assert [s for s, _ in logged[tag]] == [30], tag  # not a lone dot at step 0
        assert steps(run)[("histogram", "act/layer1")] == [0, 29]  # cadence 10,000, and the last step


def get(port, path, **query):
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_custom_scalars_one_chart_per_quantity_loss_first(server):
    """What the CUSTOM SCALARS tab asks the server: the layout, then each chart's tags per run."""
    categories = get(server, "/data/plugin/custom_scalars/layout")["category"]
    assert categories[0]["title"] == "Loss"
    charts = {chart["title"].split(":")[0]: chart["multiline"]["tag"] for c in categories for chart in c["chart"]}
    assert "act/dead" not in charts  # tanh: no such tag, so no empty chart

    def lines(chart, run="init=naive,norm=none"):  # the regexes joined as the frontend joins them
        regexes = charts[chart]
        tag = regexes[0] if len(regexes) == 1 else "|".join(f"({r})" for r in regexes)
        found = get(server, "/data/plugin/custom_scalars/scalars", run=run, tag=tag)
        assert found["regex_valid"]
        return {t: [step for _, step, _ in events] for t, events in found["tag_to_events"].items()}

    assert set(lines("loss")) == {"train/loss", "val/loss"}  # not final/val_loss nor test/loss
    ratios = lines("update_ratio")
    assert ratios == {"update_ratio/guide": [0, 29]}  # the run itself: the guide once, the first and the last step
    for layer in ("embedding", "layer1", "output"):  # a run (a colour) per layer, the quantity as the tag
        assert set(lines("update_ratio", f"init=naive,norm=none/{layer}")) == {"update_ratio/weight"}
    assert lines("act/saturation", "init=kaiming,norm=batchnorm") == {}
    assert set(lines("act/saturation", "init=kaiming,norm=batchnorm/layer1")) == {"act/saturation"}


def test_each_layer_is_a_run_of_its_own(server, sweep):
    """TensorBoard colours by run: each layer's series are a run (a subdirectory) with the quantity as
    the tag, so one card per quantity holds a line per layer; the project's reader gives the flat tags."""
    runs = get(server, "/data/runs")
    for run in ("init=naive,norm=none", "init=kaiming,norm=batchnorm"):
        assert {f"{run}/embedding", f"{run}/layer1", f"{run}/output"} <= set(runs), runs
        tags = get(server, "/data/plugin/scalars/tags")
        assert {"act/saturation", "act/std", "preact/std", "act_grad/std", "update_ratio/weight"} <= set(tags[f"{run}/layer1"])
        assert set(tags[f"{run}/output"]) == {"update_ratio/weight", "param_grad/std/weight", "param_grad/data_ratio/weight"}
        assert not [t for t in tags[run] if t.startswith(("act/", "preact/", "act_grad/", "param_grad/"))]
        assert {"train/loss", "val/loss", "init/loss", "final/saturation/layer1", "update_ratio/guide"} <= set(tags[run])
        points = get(server, "/data/plugin/scalars/scalars", run=f"{run}/layer1", tag="act/saturation")
        assert [step for _, step, _ in points] == [0, 29]  # every 1,000 steps, and the last
        assert set(get(server, "/data/plugin/histograms/tags")[f"{run}/layer1"]) == {"act", "preact", "act_grad", "param_grad/weight"}
        flat = scalars(sweep / run)
        assert [(s, v) for s, v in flat["act/saturation/layer1"]] == [(s, pytest.approx(v)) for _, s, v in points]


def test_text_tab_opens_with_start_here_then_provenance(server):
    """TensorBoard's TEXT tab groups tags by their first part, in the order of its sorted tags: it compares
    characters by code (digits, '/' and '_' before the rest), so a capital comes before any lower-case letter."""
    from actgrad.diagnostic import START_HERE

    tags = get(server, "/data/plugin/text/tags")
    runs = [run for run in tags if "/" not in run and run != "compare"]  # the jobs, not their layers or the comparison
    assert len(runs) == 4 and all({"provenance/text_summary", "status/text_summary"} <= set(tags[run]) for run in runs)
    # the runs share one start-here card (the same layers and diagnostics): written once for the sweep
    assert len([run for run in runs if "Start here/text_summary" in tags[run]]) == 1
    every = sorted({tag for run_tags in tags.values() for tag in run_tags})
    assert not [tag for tag in every if tag[0] in "/_0123456789"]  # none that TensorBoard would sort first
    assert every[:3] == ["Start here/text_summary", "Sweep loss table/text_summary", "provenance/text_summary"]
    assert len(START_HERE.splitlines()) <= 15  # whole in the card's 500 px box (looked at in a browser)
