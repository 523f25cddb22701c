"""hydra/launcher=stacked: runs of one shape trained as one stacked model, each member a normal run."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, TINY, read_statuses

from actgrad import events, init
from actgrad.checkpoint import load
from actgrad.grouping import group_key
from actgrad.model import MLP
from actgrad.stacking import member_state, stack, stack_states

from hydra_plugins.actgrad_launcher.stacked_launcher import plan_groups

STACKED = ["hydra/launcher=stacked", "trainer.enable_progress_bar=false"]
ONE_GROUP = [*STACKED, "hydra.launcher.n_jobs=1"]  # no group halved to keep a second worker busy
RUN = ["trainer.max_steps=600", "steps_per_batch=50", "log_every_n_steps=50", "val_every_n_steps=200",
       "checkpoint_every_n_steps=300", "trainer.enable_progress_bar=false"]


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, **kwargs)


def nets(norm, seeds=(0, 1, 2)):
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        net = MLP(27, 3, 10, 40, 2, norm=norm)
        init.kaiming(net)
        out.append(net)
    return out


@pytest.mark.parametrize("norm", [None, partial(nn.BatchNorm1d, momentum=0.001), nn.LayerNorm, nn.RMSNorm])
def test_a_stacked_forward_and_backward_equal_each_member_alone(norm):
    members = nets(norm)
    stacked = stack(members, 3)
    x = torch.randint(0, 27, (3, 32, 3))
    y = torch.randint(0, 27, (3, 32))
    logits = stacked(x)  # (members, vocab, batch)
    losses = nn.functional.cross_entropy(logits, y, reduction="none").mean(1)
    losses.sum().backward()
    for i, net in enumerate(members):
        alone = net(x[i])
        torch.testing.assert_close(logits[i].T, alone, rtol=1e-6, atol=1e-6)
        nn.functional.cross_entropy(alone, y[i]).backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(dict(stacked.named_parameters())[name].grad[i], p.grad, rtol=1e-5, atol=1e-7)
        if isinstance(norm, partial):  # BatchNorm: each member's own running statistics
            torch.testing.assert_close(stacked.get_submodule("blocks.0.norm").running_mean[i], net.blocks[0].norm.running_mean)


def test_a_members_state_is_its_single_runs_state_dict():
    members = nets(partial(nn.BatchNorm1d, momentum=0.001))
    state = stack(members, 3).state_dict()
    for i, net in enumerate(members):
        mine = member_state(state, i)
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in net.state_dict().items()}
        MLP(27, 3, 10, 40, 2, norm=partial(nn.BatchNorm1d, momentum=0.001)).load_state_dict(mine)  # strict
    torch.testing.assert_close(stack_states([member_state(state, i) for i in range(3)]), state)


def test_groups_are_cut_by_key_and_stack_size():
    assert plan_groups(["a", "b", "a", None, "a", "b"], stack_size=2) == [[0, 2], [1, 5], [3], [4]]
    assert plan_groups([None, None], stack_size=8) == [[0], [1]]
    # balanced under stack_size: 80 jobs at 64 make 40 + 40, not 64 + 16
    assert [len(g) for g in plan_groups(["a"] * 80, stack_size=64)] == [40, 40]
    assert [len(g) for g in plan_groups(["a"] * 7, stack_size=3)] == [3, 2, 2]
    # fewer groups than workers: the largest are halved
    assert plan_groups(["a"] * 5 + ["b"], stack_size=8, workers=3) == [[0, 1, 2], [3, 4], [5]]


def test_the_sweeps_groups_are_one_short_line_each():
    from hydra_plugins.actgrad_launcher.stacked_launcher import group_lines

    jobs = [["experiment=lecture", f"init={i}", f"seed={s}", "data.path=n.txt"] for i in ("naive", "kaiming") for s in (1, 2, 3)]
    assert group_lines(jobs, [[0, 1, 2, 3, 4], [5]]) == [
        "group 1, 5 runs: init=naive seed=1 | init=naive seed=2 | init=naive seed=3 | ... | init=kaiming seed=2",
        "group 2, 1 run: init=kaiming seed=3"]
    assert group_lines([["seed=1"]], [[0]]) == ["group 1, 1 run: seed=1"]


def test_what_may_differ_inside_a_group(composer):
    key = lambda *o: group_key(composer(*o))  # noqa: E731
    base = key()
    assert base is not None
    for same in (["init=naive"], ["seed=3"], ["optimizer.lr=0.3"], ["optimizer.momentum=0.9"],
                 ["callbacks=full"], ["checkpoint_every_n_steps=7"]):
        assert key(*same) == base, same
    for other in (["norm=none"], ["model.n_hidden=100"], ["optimizer=adam"], ["trainer.max_steps=10"],
                  ["data.batch_size=64"], ["scheduler=cosine"]):
        assert key(*other) != base, other
    # trains alone: a plain Lightning callback would see the whole stack; torch.optim has no flat buffer
    assert key("+callbacks.timer._target_=lightning.pytorch.callbacks.Timer") is None
    assert key("optimizer._target_=torch.optim.SGD") is None
    assert key("+trainer.precision=bf16-mixed") is None


def loss_curves(run_dir):
    logged = events.scalars(run_dir)
    return {tag: points for tag, points in logged.items() if tag in ("train/loss", "val/loss", "test/loss")}


def assert_same_run(stacked_dir, single_dir, rel=1e-5):
    """Every train/val/test loss point of a member equals its single run's."""
    mine, theirs = loss_curves(stacked_dir), loss_curves(single_dir)
    assert sorted(mine) == sorted(theirs) == ["test/loss", "train/loss", "val/loss"]
    for tag in theirs:
        assert [s for s, _ in mine[tag]] == [s for s, _ in theirs[tag]], tag
        for (step, a), (_, b) in zip(mine[tag], theirs[tag]):
            assert a == pytest.approx(b, rel=rel), (tag, step)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, lrs", [("sgd", "0.1,0.03"), ("adam", "0.01,0.003")])
def test_each_member_equals_its_single_run(optimizer, lrs, names_txt, tmp_path):
    """Same data order, same init, per-member lr through the lecture's step decay, BatchNorm."""
    common = [*RUN, f"data.path={names_txt}", f"optimizer={optimizer}", "norm=batchnorm", "callbacks=default"]
    proc = run_cli("-m", *ONE_GROUP, *common, "init=naive,kaiming", f"optimizer.lr={lrs}",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "as 1 groups" in proc.stderr + proc.stdout  # all four stacked together
    statuses = read_statuses(tmp_path / "sweep")
    assert len(statuses) == 4 and all(s["status"] == "completed" for s in statuses.values())
    lr = lrs.split(",")[1]
    single = tmp_path / "single"
    proc = run_cli(*common, "init=naive", f"optimizer.lr={lr}", f"hydra.run.dir={single}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    member = tmp_path / "sweep" / f"init=naive,optimizer.lr={lr}"
    assert_same_run(member, single)
    # the same checkpoint contents as the single run's, bar the arithmetic of batching
    a, b = load(member / "checkpoints" / "last.ckpt"), load(single / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and a["callbacks"].keys() == b["callbacks"].keys()
    assert a["optimizer_states"][0]["param_groups"] == b["optimizer_states"][0]["param_groups"]
    assert a["lr_schedulers"] == b["lr_schedulers"]
    for name, tensor in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][name], tensor, rtol=1e-4, atol=1e-5)
    assert a["actgrad"]["config_hash"] == b["actgrad"]["config_hash"]
    # what a person looks at is a single run's: the same tags
    assert events.scalars(member).keys() == events.scalars(single).keys()
    assert [p.name for p in events.subruns(member)] == ["embedding", "layer1", "output"]  # a TensorBoard run per layer
    assert (member / ".hydra" / "overrides.yaml").is_file() and (member / "run.yaml").is_file()


@pytest.mark.slow
def test_a_diverging_member_is_frozen_and_the_others_finish(small_names, tmp_path):
    common = [*TINY, f"data.path={small_names}"]
    proc = run_cli("-m", *ONE_GROUP, *common, "optimizer.lr=0.1,1e30", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "as 1 groups" in proc.stderr + proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = read_statuses(tmp_path / "sweep")
    assert statuses["optimizer.lr=1e+30"]["status"] == "diverged"
    assert statuses["optimizer.lr=1e+30"]["steps"] <= 20
    assert statuses["optimizer.lr=0.1"]["status"] == "completed"
    assert "1 completed, 0 already completed, 1 diverged, 0 failed" in proc.stderr + proc.stdout
    proc = run_cli(*common, "optimizer.lr=0.1", f"hydra.run.dir={tmp_path / 'single'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "sweep" / "optimizer.lr=0.1", tmp_path / "single")


@pytest.mark.slow
def test_a_member_with_a_bad_setting_fails_alone(small_names, tmp_path):
    proc = run_cli("-m", *ONE_GROUP, *TINY, f"data.path={small_names}", "optimizer.lr=0.1,-1,0.05",
                   f"hydra.sweep.dir={tmp_path}")
    statuses = read_statuses(tmp_path)
    assert statuses["optimizer.lr=-1"]["status"] == "failed"
    assert "optimizer.lr=-1" in statuses["optimizer.lr=-1"]["error"]
    assert "\n" not in statuses["optimizer.lr=-1"]["error"]
    assert statuses["optimizer.lr=0.1"]["status"] == statuses["optimizer.lr=0.05"]["status"] == "completed"
    assert "2 completed, 0 already completed, 0 diverged, 1 failed" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_a_stopped_group_resumes_and_a_member_resumes_alone(names_txt, tmp_path):
    """SIGTERM mid-sweep: every member saves and stops; the rerun resumes them all; one member,
    resumed alone by a single run, ends where its stacked twin ended."""
    common = ["trainer.max_steps=8000", "steps_per_batch=100", "log_every_n_steps=100", "val_every_n_steps=2000",
              "checkpoint_every_n_steps=1000", "trainer.enable_progress_bar=false", "callbacks=default",
              f"data.path={names_txt}"]
    sweep = tmp_path / "sweep"
    args = [sys.executable, "train.py", "-m", *ONE_GROUP, *common, "init=naive,kaiming", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(sweep.glob("*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    statuses = read_statuses(sweep)
    assert [s["status"] for s in statuses.values()] == ["interrupted"] * 2, out[-3000:]
    stopped = {name: s["steps"] for name, s in statuses.items()}
    assert len(set(stopped.values())) == 1 and 0 < next(iter(stopped.values())) < 8000
    # a copy of one member, resumed by a single run
    alone = tmp_path / "alone"
    subprocess.run(["cp", "-r", str(sweep / "init=kaiming"), str(alone)], check=True)
    rerun = run_cli("-m", *ONE_GROUP, *common, "init=naive,kaiming", f"hydra.sweep.dir={sweep}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    statuses = read_statuses(sweep)
    assert all(s["status"] == "completed" and s["steps"] == 8000 for s in statuses.values())
    single = run_cli(*common, "init=kaiming", f"hydra.run.dir={alone}")
    assert single.returncode == 0, single.stderr[-3000:]
    assert "resuming from" in single.stderr + single.stdout
    assert_same_run(sweep / "init=kaiming", alone)
    for run in (sweep / "init=naive", sweep / "init=kaiming", alone):  # each layer's subrun purged at the resume too
        steps = [s for s, _ in events.scalars(run)["act/saturation/layer1"]]
        assert steps == sorted(set(steps)) and steps[-1] == 7999, steps
    # and a rerun of the finished sweep trains nothing
    again = run_cli("-m", *ONE_GROUP, *common, "init=naive,kaiming", f"hydra.sweep.dir={sweep}")
    assert "0 completed, 2 already completed" in again.stderr + again.stdout


def test_a_stacked_group_trains_on_a_free_gpu_of_the_pool(monkeypatch, tmp_path):
    """Two GPUs faked, GPU 0 busy (its slot held): the group takes GPU 1 for every member."""
    from omegaconf import OmegaConf

    import actgrad.gpus
    from actgrad.gpus import take_gpu
    from hydra_plugins.actgrad_launcher.stacked_launcher import free_gpu

    monkeypatch.setattr(actgrad.gpus, "gpu_count", lambda: 2)
    configs = [OmegaConf.create({"trainer": {"accelerator": "auto", "devices": 1}, "jobs_per_gpu": 1,
                                 "hydra": {"sweep": {"dir": str(tmp_path)}}}) for _ in range(3)]
    with take_gpu(tmp_path, 2, 1) as busy, free_gpu(configs) as gpu:
        assert (busy, gpu) == (0, 1)
        assert [(c.trainer.accelerator, list(c.trainer.devices)) for c in configs] == [("gpu", [1])] * 3
    with free_gpu(configs) as gpu:  # given back: free again
        assert gpu == 0


@pytest.mark.slow
def test_groups_as_submitit_jobs(small_names, tmp_path):
    """hydra/launcher=stacked_slurm with submitit's local executor: one job per group, members normal runs."""
    pytest.importorskip("submitit")
    proc = run_cli("-m", "hydra/launcher=stacked_slurm", "hydra.launcher.submitit.cluster=local", *TINY,
                   f"data.path={small_names}", "optimizer.lr=0.1,0.05", "norm=none,batchnorm",
                   f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted 2 groups as local jobs" in proc.stderr + proc.stdout
    statuses = read_statuses(tmp_path)
    assert len(statuses) == 4 and all(s["status"] == "completed" for s in statuses.values())
    assert len(list(tmp_path.glob(".submitit/*/*_result.pkl"))) == 2


def test_a_stack_too_big_for_memory_is_refused_in_one_line(monkeypatch, composer, small_names, tmp_path):
    import actgrad.group
    from actgrad.group import train_group

    monkeypatch.setattr(actgrad.group, "available_memory", lambda: 10**6)  # 1 MB left
    cfgs = [composer(*TINY, f"data.path={small_names}", f"optimizer.lr={lr}") for lr in (0.1, 0.05)]
    results = train_group(cfgs, [tmp_path / "a", tmp_path / "b"])
    for result, name in zip(results, "ab"):
        assert result["status"] == "failed"
        assert "lower hydra.launcher.stack_size" in result["error"] and "\n" not in result["error"]
        assert sorted(os.listdir(tmp_path / name)) == ["attempts.jsonl", "status.yaml"]  # no half-written run


@pytest.mark.slow
@pytest.mark.parametrize("common, members", [
    # SGD: per-member lr, momentum and weight decay; LayerNorm; cosine schedule; inits and seeds differ
    (["optimizer=sgd", "norm=layernorm", "scheduler=cosine"],
     [["optimizer.lr=0.1", "optimizer.momentum=0.9", "init=xavier"],
      ["optimizer.lr=0.05", "optimizer.weight_decay=0.001", "init=pytorch", "seed=7"],
      ["optimizer.lr=0.02", "init=scaled"]]),
    # AdamW: per-member betas, eps and weight decay; no norm; the lecture's step decay
    (["optimizer=adamw", "norm=none"],
     [["optimizer.lr=0.01", "optimizer.betas=[0.8,0.99]"],
      ["optimizer.lr=0.003", "optimizer.weight_decay=0.1", "+optimizer.eps=1e-6", "init=scaled_output"],
      ["optimizer.lr=0.005", "init=naive"]]),
])
def test_per_member_hyperparameters_match_single_runs(common, members, composer, small_names, tmp_path):
    from actgrad.experiment import train
    from actgrad.group import train_group

    run = ["trainer.max_steps=300", "steps_per_batch=50", "log_every_n_steps=25", "val_every_n_steps=100",
           "trainer.enable_progress_bar=false", "callbacks=default", f"data.path={small_names}"]
    probe = ["+callbacks.probe._target_=test_stacked.MemberProbe"]
    keys = {group_key(composer(*run, *common, *own)) for own in members}
    assert len(keys) == 1 and None not in keys
    cfgs = [composer(*run, *common, *own, *probe) for own in members]
    MemberProbe.seen = []
    stacked = train_group(cfgs, [tmp_path / f"stacked{i}" for i in range(len(cfgs))])
    assert [r["status"] for r in stacked] == ["completed"] * len(cfgs)
    seen_stacked, MemberProbe.seen = MemberProbe.seen, []
    for i, cfg in enumerate(cfgs):
        single = train(cfg, tmp_path / f"single{i}")
        assert stacked[i]["final/val_loss"] == pytest.approx(single["final/val_loss"], rel=1e-5)
        assert_same_run(tmp_path / f"stacked{i}", tmp_path / f"single{i}")
        # best.ckpt: the member's own ModelCheckpoint chose the step its single run's chose, with its weights
        a, b = (load(tmp_path / f"{kind}{i}" / "checkpoints" / "best.ckpt") for kind in ("stacked", "single"))
        assert a["global_step"] == b["global_step"]
        best = lambda c: next(v for k, v in c["callbacks"].items() if k.startswith("ModelCheckpoint"))  # noqa: E731
        assert float(best(a)["best_model_score"]) == pytest.approx(float(best(b)["best_model_score"]), rel=1e-5)
        assert best(a)["best_model_path"] == str(tmp_path / f"stacked{i}" / "checkpoints" / "best.ckpt")
        torch.testing.assert_close(a["state_dict"], b["state_dict"], rtol=1e-4, atol=1e-5)
    # a member's callbacks saw Lightning's trainer and the member's own module: its final weights, as its single run's
    assert [hook for hook, *_ in seen_stacked] == ["setup"] * 3 + ["on_train_start"] * 3 + ["on_train_end"] * 3
    assert [hook for hook, *_ in MemberProbe.seen] == ["setup", "on_train_start", "on_train_end"] * 3
    for i in range(len(cfgs)):
        _, trainer, step, weights = seen_stacked[6 + i]
        _, single_trainer, single_step, single_weights = MemberProbe.seen[3 * i + 2]
        assert trainer == single_trainer == "Trainer" and step == single_step == 300
        torch.testing.assert_close(weights, single_weights, rtol=1e-4, atol=1e-5)


class MemberProbe(L.Callback):
    """An actgrad callback (its module says so) that records what its start and end hooks are given."""

    __module__ = "actgrad.probe"  # a callback of actgrad's own may serve a stack's member
    seen = []

    def record(self, hook, trainer, pl_module):
        weights = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        MemberProbe.seen.append((hook, type(trainer).__name__, trainer.global_step, weights))

    def setup(self, trainer, pl_module, stage):
        self.record("setup", trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        self.record("on_train_start", trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.record("on_train_end", trainer, pl_module)


def test_a_stack_size_below_one_is_refused_in_one_line(tmp_path):
    proc = run_cli("-m", "hydra/launcher=stacked", "hydra.launcher.stack_size=0", f"hydra.sweep.dir={tmp_path / 's'}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: hydra.launcher.stack_size=0: must be a whole number >= 1 "
                                   "(runs in one stacked model)")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_run_whose_callback_cannot_serve_a_member_trains_alone(small_names, tmp_path):
    """A callback of actgrad's with a Lightning hook on every batch: grouped by its config, then found
    unable to serve a member's view when built: each run trains as Hydra runs any job."""
    extra = ["+callbacks.extra._target_=actgrad.checkpoint.LastCheckpoint", f"+callbacks.extra.dirpath={tmp_path / 'x'}"]
    proc = run_cli("-m", *ONE_GROUP, *TINY, f"data.path={small_names}", "optimizer.lr=0.1,0.05", *extra,
                   f"hydra.sweep.dir={tmp_path / 's'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "as 1 groups" in proc.stdout + proc.stderr and "runs stacked" not in proc.stdout + proc.stderr
    statuses = read_statuses(tmp_path / "s")
    assert [s["status"] for s in statuses.values()] == ["completed"] * 2


def test_a_job_whose_config_cannot_stack_is_said_at_the_start_and_recorded(small_names, tmp_path):
    """A torch optimizer keeps a job out of any stack (the stacked update needs actgrad.optim's flat buffers):
    one line per job before anything trains, and a note in its attempts.jsonl."""
    proc = run_cli("-m", *ONE_GROUP, *TINY, f"data.path={small_names}", "optimizer._target_=torch.optim.SGD",
                   "seed=1,2", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    reason = "trains alone: optimizer torch.optim.SGD: stacking needs actgrad's own optimizers"
    assert said.count(reason) == 2 and said.index(reason) < said.index("completed at step")
    for seed in (1, 2):
        notes = [a.get("note") for a in map(json.loads, (tmp_path / f"seed={seed}" / "attempts.jsonl").read_text().splitlines())]
        assert any(n and n.startswith(reason) for n in notes)


@pytest.mark.slow
def test_an_optuna_search_stacks_each_batch_of_trials(small_names, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli("-m", "search=lr_gain", *ONE_GROUP, *TINY, f"data.path={small_names}", "hydra.sweeper.n_trials=4",
                   "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("Launching 2 jobs as 1 groups") == 2  # two batches of two trials, each stacked
    statuses = read_statuses(tmp_path)
    assert len(statuses) == 4 and all(s["status"] == "completed" for s in statuses.values())
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_value" in best
    # the comparison run: each trial a configuration of its own, named by its sampled values
    from actgrad import events
    from actgrad.configurations import configurations

    configs = configurations(tmp_path)
    assert len(configs) == 4 and all(len(dirs) == 1 for dirs in configs.values())
    board = events.accumulate(tmp_path / "compare")
    table = board.Tensors("Sweep loss table/text_summary")[0].tensor_proto.string_val[0].decode()
    for label in configs:
        assert "optimizer.lr=" in label and "init.gain=" in label
        assert f"| {label} | 1 |" in table


def test_each_group_shows_a_bar_and_its_members_end_lines(small_names, tmp_path):
    """Two groups in two worker processes: each draws its own bar on a line of its own (job number modulo
    n_jobs) and says where each member wrote, as a single run does; the workers start without Hydra's logging."""
    proc = run_cli("-m", "hydra/launcher=stacked", "hydra.launcher.n_jobs=2", *TINY, f"data.path={small_names}",
                   "trainer.enable_progress_bar=true", "init=naive,kaiming", "norm=none,batchnorm",
                   f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "as 2 groups" in out
    for group in ("init=naive,norm=none", "init=naive,norm=batchnorm"):
        assert re.search(rf"{re.escape(group)} \+1 stacked: 100%\|.*\| 40/40", out), out[-3000:]
    for run in ("init=naive,norm=none", "init=kaiming,norm=none", "init=naive,norm=batchnorm", "init=kaiming,norm=batchnorm"):
        assert f"run {tmp_path / run}: completed at step 40" in out


def test_a_run_that_cannot_stack_says_why():
    from actgrad.group import why_alone
    from actgrad.model import WaveNet
    from actgrad.optim import SGD

    for net, block in ((MLP(27, 3, 10, 40, 2, norm=nn.RMSNorm), 3), (WaveNet(27, 8, norm=nn.BatchNorm1d), 8)):
        assert why_alone(net, [], block, SGD(net.parameters(), lr=0.1)) is None
    conv = nn.Sequential(nn.Embedding(27, 4), nn.Conv1d(3, 3, 1), nn.Flatten(), nn.Linear(12, 27))
    assert why_alone(conv, [], 3) == "1 (Conv1d) has no stacked form"
    net = MLP(27, 3, 10, 40, 1)
    assert why_alone(net, [], 3, torch.optim.SGD(net.parameters(), lr=0.1)) == (
        "optimizer torch.optim.sgd.SGD: stacking needs actgrad's own optimizers (actgrad.optim: SGD, Adam, AdamW)")
