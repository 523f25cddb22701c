"""Load a run anywhere: actgrad.load(run dir or checkpoint) needs nothing but the checkpoint; any word list trains."""

import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

import actgrad
from actgrad.checkpoint import load as read_checkpoint
from actgrad.data import VOCAB
from actgrad.experiment import build, train
from actgrad.model import MLP
from actgrad.module import LanguageModel
from actgrad.run import Run

from conftest import ROOT, TINY, make_config

ACCENTED = ["zoë", "josé", "r2d2", "åsa"]


def train_moved(names_file, run_dir, *overrides):
    """Train a tiny run; return (cfg, reference): the module experiment.build makes from the config, given
    last.ckpt's weights, in eval mode. Then the data file is renamed: nothing may read it any more."""
    cfg = make_config(*TINY, f"data.path={names_file}", *overrides)
    assert train(cfg, run_dir)["status"] == "completed"
    data, reference = build(cfg)
    reference.load_state_dict(read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"])
    reference.eval()
    assert reference.vocab == data.vocab
    names_file.rename(names_file.with_suffix(".moved"))
    return cfg, reference


def contexts(vocab_size, block_size=3, n=64):
    return torch.randint(0, vocab_size, (n, block_size), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def trained(small_names, tmp_path):
    run_dir = tmp_path / "run"
    cfg, reference = train_moved(small_names, run_dir)
    assert not small_names.exists()
    return run_dir, reference


def test_a_run_dir_or_its_checkpoint_loads_the_trained_model_without_the_data(trained):
    run_dir, reference = trained
    x = contexts(len(reference.vocab))
    rng = torch.get_rng_state()
    for path in (run_dir, run_dir / "checkpoints" / "last.ckpt", str(run_dir)):
        run = actgrad.load(path)
        assert isinstance(run, Run) and isinstance(run.model, LanguageModel)
        assert run.checkpoint == run_dir / "checkpoints" / "last.ckpt" and run.step == 40
        assert run.vocab == run.model.vocab == reference.vocab == VOCAB and run.block_size == 3
        assert not run.model.training and not run.model.net.training
        assert {p.device.type for p in run.model.parameters()} == {"cpu"}
        assert torch.equal(run.model(x), reference(x))
        assert run.config.optimizer.lr == 0.1 and run.config.trainer.max_steps == 40
        assert str(run_dir) in repr(run) and "step=40" in repr(run) and len(repr(run)) < 200
    assert torch.equal(torch.get_rng_state(), rng)  # rebuilding the net drew no numbers from the caller's RNG


def test_every_checkpoint_stores_the_vocabulary_as_a_plain_string(trained):
    run_dir, reference = trained
    for name in ("last.ckpt", "best.ckpt"):
        checkpoint = read_checkpoint(run_dir / "checkpoints" / name)  # weights_only=True
        assert checkpoint["actgrad"]["vocab"] == reference.vocab and type(checkpoint["actgrad"]["vocab"]) is str
        assert "config_hash" in checkpoint["actgrad"]  # what was there stays


def test_lightning_load_from_checkpoint_works(trained):
    run_dir, reference = trained
    x = contexts(len(reference.vocab))
    for path in (run_dir / "checkpoints" / "last.ckpt", run_dir):
        module = LanguageModel.load_from_checkpoint(path)
        assert type(module) is LanguageModel and not module.training and module.vocab == reference.vocab
        assert torch.equal(module(x), reference(x))
    best = run_dir / "checkpoints" / "best.ckpt"
    module = LanguageModel.load_from_checkpoint(best, map_location="cpu")
    expected = read_checkpoint(best)["state_dict"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in expected.items())
    assert actgrad.load(best).checkpoint == best
    with pytest.raises(ValueError, match="no such run dir or checkpoint"):
        LanguageModel.load_from_checkpoint(run_dir / "nope.ckpt")


def test_sampling_is_deterministic_per_seed_and_uses_only_the_vocabulary(trained):
    run = actgrad.load(trained[0])
    rng = torch.get_rng_state()
    names = run.sample(20, seed=1)
    assert len(names) == 20 and names == run.sample(20, seed=1) != run.sample(20, seed=2)
    assert all(name and set(name) <= set(run.vocab[1:]) for name in names)
    assert all(len(name) <= 5 for name in run.sample(20, seed=1, max_length=5))
    assert torch.equal(torch.get_rng_state(), rng) and not run.model.training
    assert run.encode("emma") == [5, 13, 13, 1]
    with pytest.raises(ValueError, match="not in this run's vocabulary"):
        run.encode("zoë")


def test_accented_names_train_end_to_end_and_sample_their_own_vocabulary(tmp_path):
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(ACCENTED * 75) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    _, reference = train_moved(names_file, run_dir)
    vocab = ".2adjorszåéë"  # '.' and the sorted characters of the file
    assert reference.vocab == vocab and reference.net.embedding.num_embeddings == len(vocab)
    run = actgrad.load(run_dir)
    assert run.vocab == vocab and read_checkpoint(run.checkpoint)["actgrad"]["vocab"] == vocab
    x = contexts(len(vocab))
    assert torch.equal(run.model(x), reference(x))
    names = run.sample(50, seed=0)
    assert all(name and set(name) <= set(vocab[1:]) for name in names)
    assert set("".join(names)) & set("åéë") and set(names) & set(ACCENTED)  # it learned some of them
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), str(run_dir), "--n", "5", "--seed", "0"],
                          capture_output=True, text=True, encoding="utf-8", env=os.environ | {"PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == names[:5]


def test_a_checkpoint_without_a_vocabulary_is_the_lectures(trained, tmp_path):
    """Checkpoints written before the vocabulary was stored: then it was always '.' + a-z."""
    run_dir, reference = trained
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    del checkpoint["actgrad"]["vocab"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    run = actgrad.load(old)
    assert run.vocab == VOCAB
    x = contexts(27)
    assert torch.equal(run.model(x), reference(x))


def test_bad_paths_are_one_line_errors_naming_the_path(tmp_path):
    empty_dir = tmp_path / "empty_run"
    empty_dir.mkdir()
    only_best = tmp_path / "only_best"
    (only_best / "checkpoints").mkdir(parents=True)
    (only_best / "checkpoints" / "best.ckpt").write_bytes(b"")
    text = tmp_path / "names.txt"
    text.write_text("anna\n" * 20)
    not_actgrad = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, not_actgrad)
    pickled = tmp_path / "pickled.ckpt"  # a zip as torch.save writes, holding an object: loading it would run code
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}, "data": {}}, "x": ValueError("code")}, pickled)
    legacy = tmp_path / "legacy.ckpt"  # a bare pickle
    with open(legacy, "wb") as f:
        pickle.dump({"x": ValueError("code")}, f, protocol=2)
    zipped_text = tmp_path / "names.zip"
    with zipfile.ZipFile(zipped_text, "w") as z:
        z.writestr("names.txt", "anna\n")
    cases = [
        (tmp_path / "nope", "no such run dir or checkpoint"),
        (empty_dir, "no checkpoint in this run dir (no checkpoints/last.ckpt)"),
        (only_best, "give that file"),
        (text, "not a checkpoint (torch.save writes a zip archive"),
        (legacy, "not a checkpoint (torch.save writes a zip archive"),
        (zipped_text, "not a readable checkpoint"),
        (not_actgrad, "not a checkpoint of an actgrad run"),
        (pickled, "refused, since loading it could run code"),
    ]
    for path, says in cases:
        for loader in (actgrad.load, LanguageModel.load_from_checkpoint):
            with pytest.raises(ValueError) as err:
                loader(path)
            message = str(err.value)
            assert says in message and str(path) in message and "\n" not in message, (path, message)


def test_sample_script_on_a_bad_path_says_one_error_line(tmp_path):
    script = str(ROOT / "scripts" / "sample.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {tmp_path / 'nope'}: no such run dir or checkpoint"]
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "RUN_DIR_OR_CHECKPOINT" in proc.stdout and "checkpoints/last.ckpt" in proc.stdout


def test_import_actgrad_stays_light():
    code = ("import sys, actgrad; assert not {'torch', 'lightning'} & set(sys.modules); "
            "from actgrad import load; assert load is actgrad.load and callable(load)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- loading builds only what actgrad knows ------------------------------------------------------

HELPERS = '''
from pathlib import Path

from actgrad.model import MLP

MARKER = Path(__file__).with_name("marker")


def mark(*args, **kwargs):
    MARKER.write_text("ran")


class Net(MLP):
    """A model class of one's own (here with MLP's weights, so last.ckpt fits it)."""
'''


@pytest.fixture
def helpers(tmp_path, monkeypatch):
    """A module of one's own on sys.path (load_helpers): mark() writes its marker file, Net is an MLP."""
    (tmp_path / "load_helpers.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "load_helpers", raising=False)  # this test's file, not an earlier test's
    return tmp_path / "marker"


def edited(run_dir, tmp_path, change):
    """A copy of last.ckpt whose stored config `change` (a function of it) edited."""
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    change(checkpoint["hyper_parameters"])
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    return path


def put(*keys, value):
    def change(config):
        node = config
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return change


@pytest.mark.parametrize("change, says", [
    (put("norm", "_target_", value="load_helpers.mark"),
     "norm._target_=load_helpers.mark, which actgrad.load does not build"),
    (put("model", "_target_", value="load_helpers.mark"), "model._target_=load_helpers.mark, which"),
    (put("optimizer", "_target_", value="load_helpers.mark"), "optimizer._target_=load_helpers.mark, which"),
    (put("scheduler", "_target_", value="load_helpers.mark"), "scheduler._target_=load_helpers.mark, which"),
    (put("model", "n_embd", value={"_target_": "load_helpers.mark"}), "model.n_embd._target_=load_helpers.mark, which"),
    (put("scheduler", "at", value=[{"_target_": "load_helpers.mark", "_partial_": True}]),
     "scheduler.at[0]._target_=load_helpers.mark, which"),
    (put("norm", value="${model.oops}"), "norm='${model.oops}', an interpolation, which actgrad.load does not resolve"),
    (put("norm", "eps", value="${oc.env:HOME}"), "norm.eps='${oc.env:HOME}', an interpolation"),
])
def test_a_checkpoint_naming_a_function_of_its_own_is_refused_before_anything_runs(trained, tmp_path, helpers,
                                                                                   change, says):
    run_dir, _ = trained
    path = edited(run_dir, tmp_path, change)
    for loader in (actgrad.load, LanguageModel.load_from_checkpoint):
        with pytest.raises(ValueError) as err:
            loader(path)
        message = str(err.value)
        assert message.startswith(f"{path}: its config names ") and says in message and "\n" not in message
        assert "allowed: actgrad.model.*, actgrad.optim.*, actgrad.schedule.*, torch.nn.*, torch.optim.*" in message
    assert not helpers.exists()  # nothing the file names was called
    assert actgrad.load(run_dir).step == 40  # the untouched checkpoint still loads


def test_a_name_that_only_leads_through_actgrad_or_torch_is_refused(trained, tmp_path, helpers):
    """actgrad.optim imports torch, which imports os: the name starts well, and is os.system."""
    run_dir, _ = trained
    path = edited(run_dir, tmp_path, put("optimizer", value={"_target_": "actgrad.optim.torch.os.system",
                                                             "_args_": [f"touch {helpers}"]}))
    with pytest.raises(ValueError, match=r"optimizer._target_=actgrad.optim.torch.os.system, which actgrad.load"):
        actgrad.load(path)
    path = edited(run_dir, tmp_path, put("model", "n_embd", value={"_target_": "actgrad.rundir.write_atomic",
                                                                  "path": str(helpers), "text": "ran"}))
    with pytest.raises(ValueError, match=r"model.n_embd._target_=actgrad.rundir.write_atomic, which"):
        actgrad.load(path)  # actgrad's, but no model, optimizer or schedule: it writes any file it is given
    assert not helpers.exists()


def test_model_lets_a_callers_own_class_through(trained, tmp_path, helpers):
    from actgrad.run import load  # actgrad.load(path) is its lazy alias

    run_dir, reference = trained
    path = edited(run_dir, tmp_path, put("model", "_target_", value="load_helpers.Net"))
    with pytest.raises(ValueError, match=r"model._target_=load_helpers.Net, which actgrad.load does not build"):
        load(path)
    import load_helpers

    x = contexts(len(reference.vocab))
    for run in (load(path, model=load_helpers.Net), load(path, allow=("load_helpers",)),
                load(path, allow="load_helpers.")):
        assert type(run.model.net) is load_helpers.Net and torch.equal(run.model(x), reference(x))
    with pytest.raises(ValueError, match=r"model._target_=load_helpers.Net, which"):
        load(path, model=MLP)  # another class: the stored name must be the one given
    path = edited(run_dir, tmp_path, put("norm", "_target_", value="load_helpers.mark"))
    with pytest.raises(ValueError, match=r"norm._target_=load_helpers.mark, which .*load_helpers.Net.*"):
        load(path, model=load_helpers.Net)  # the class vouches for itself, not for its module
    assert not helpers.exists()


def test_sample_script_builds_a_model_of_ones_own_only_with_allow(trained, tmp_path, helpers):
    run_dir, _ = trained
    path = edited(run_dir, tmp_path, put("model", "_target_", value="load_helpers.Net"))
    script, env = str(ROOT / "scripts" / "sample.py"), {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: {path}: its config names model._target_=load_helpers.Net, which actgrad.load does not build "
        "(allowed: actgrad.model.*, actgrad.optim.*, actgrad.schedule.*, torch.nn.*, torch.optim.*; or pass --allow NAME)"]
    proc = subprocess.run([sys.executable, script, str(path), "--allow", "load_helpers", "--n", "3", "--seed", "1"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == actgrad.load(path, allow=("load_helpers",)).sample(3, seed=1)


def test_what_load_builds_is_decided_by_name_and_by_where_it_is_defined():
    from actgrad.run import ALLOWED, allowed_names, builds

    for ok in ("actgrad.model.MLP", "actgrad.optim.SGD", "actgrad.schedule.step_decay", "torch.nn.BatchNorm1d",
               "torch.nn.LayerNorm", "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.AdamW"):
        assert builds(ok, ALLOWED), ok
    for bad in ("builtins.print", "os.system", "actgrad.rundir.write_atomic", "actgrad.experiment.train",
                "actgrad.optim.torch.os.system", "actgrad.model.nn.modules.module.torch.save", "torch.save",
                "actgrad.model.MLP.__init__.__globals__", "${x}", "actgrad.model.MLP ", ".actgrad.model", None, 3):
        assert not builds(bad, ALLOWED), bad
    assert builds("torch.nn.Linear", allowed_names()) and not builds("mymod.Net", allowed_names())
    assert allowed_names(model=MLP)[-1] == "actgrad.model.MLP"
    for bad in (dict(model=3), dict(model="mymod.Net"), dict(allow="my pkg"), dict(allow=[None])):
        with pytest.raises(ValueError) as err:
            allowed_names(**bad)
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{next(iter(bad))}=")
