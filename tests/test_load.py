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
