"""Networks the code was not written for, through everything a run does: a single run, a resume,
actgrad.load and scripts/report.py. One is built from torch.nn alone by the config (nobody here wrote
it); one calls a ReLU module in two places (a residual net); one nests GELU and LayerNorm in
containers; one uses a functional activation (no layer diagnostics, parameter ones still)."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict

import actgrad
from actgrad.experiment import train

from conftest import ROOT, TINY, make_config
from test_fast_path import StopAt
from test_train import scalars

RUN = [t for t in TINY if t != "callbacks=none"] + ["model=custom", "init=kaiming",
                                                    "callbacks=[activations,update_ratio,initial_loss]",
                                                    "callbacks.activations.every_n_steps=10",
                                                    "callbacks.update_ratio.every_n_steps=10"]


class Residual(nn.Module):
    """x + relu(W x), with one ReLU module called twice."""

    def __init__(self, vocab_size, block_size, width=32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.inp = nn.Linear(8 * block_size, width)
        self.mid = nn.Linear(width, width)
        self.relu = nn.ReLU()
        self.head = nn.Linear(width, vocab_size)

    def forward(self, idx):
        x = self.relu(self.inp(self.embed(idx).flatten(1)))
        return self.head(x + self.relu(self.mid(x)))


class Nested(nn.Module):
    def __init__(self, vocab_size, block_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.body = nn.ModuleList([nn.Sequential(nn.Linear(8 * block_size, 24), nn.LayerNorm(24), nn.GELU()),
                                   nn.Sequential(nn.Sequential(nn.Linear(24, 24), nn.LayerNorm(24)), nn.GELU())])
        self.head = nn.Linear(24, vocab_size)

    def forward(self, idx):
        x = self.embed(idx).flatten(1)
        for part in self.body:
            x = part(x)
        return self.head(x)


class Functional(nn.Module):
    def __init__(self, vocab_size, block_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.hidden = nn.Linear(8 * block_size, 32)
        self.head = nn.Linear(32, vocab_size)

    def forward(self, idx):
        return self.head(torch.tanh(self.hidden(self.embed(idx).flatten(1))))


def from_torch_alone(vocab=27, block=3):
    """A model config of torch.nn modules only: Embedding -> Flatten -> Linear -> Tanh -> Linear -> Tanh -> Linear."""
    layer = lambda target, **kw: {"_target_": f"torch.nn.{target}", **kw}  # noqa: E731
    return {"_target_": "torch.nn.Sequential", "_args_": [
        layer("Embedding", num_embeddings=vocab, embedding_dim=8), layer("Flatten"),
        layer("Linear", in_features=8 * block, out_features=32), layer("Tanh"),
        layer("Linear", in_features=32, out_features=32), layer("Tanh"),
        layer("Linear", in_features=32, out_features=vocab)]}


def config(model, names, *overrides):
    cfg = make_config(*RUN, f"data.path={names}", *overrides,
                      f"model._target_={model if isinstance(model, str) else 'torch.nn.Sequential'}")
    if not isinstance(model, str):
        with open_dict(cfg):
            cfg.model = OmegaConf.create(model)
    return cfg


@pytest.fixture
def here(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    return "test_networks_we_did_not_write"


@pytest.mark.parametrize("model, layers, weights", [
    ("torch", ["layer1", "layer2"], ["0.weight", "layer1.2.weight", "layer2.4.weight", "6.weight"]),
    ("Residual", ["layer1", "layer2"], ["embed.weight", "layer1.inp.weight", "layer2.mid.weight", "head.weight"]),
    ("Nested", ["layer1", "layer2"], ["embed.weight", "layer1.body.0.0.weight", "layer2.body.1.0.0.weight", "head.weight"]),
    ("Functional", [], ["embed.weight", "hidden.weight", "head.weight"]),
])
def test_a_network_we_did_not_write_trains_resumes_loads_and_reports(model, layers, weights, here, small_names, tmp_path):
    target = from_torch_alone() if model == "torch" else f"{here}.{model}"
    whole = train(config(target, small_names), tmp_path / "whole")
    assert whole["status"] == "completed" and math.isfinite(whole["final/val_loss"])
    logged = scalars(tmp_path / "whole")
    assert sorted(t.rsplit("/", 1)[1] for t in logged if t.startswith("act/saturation/")) == layers
    assert sorted(t.removeprefix("update_ratio/") for t in logged if t.startswith("update_ratio/") and
                  t.endswith("weight")) == sorted(weights)

    stopped = train(config(target, small_names), tmp_path / "split", extra_callbacks=[StopAt(20)])
    assert stopped["status"] == "interrupted"
    resumed = train(config(target, small_names), tmp_path / "split")
    assert resumed["status"] == "completed" and resumed["final/val_loss"] == whole["final/val_loss"]

    run = actgrad.load(tmp_path / "whole", model=None if model == "torch" else getattr(sys.modules[here], model))
    assert len(run.sample(3, seed=1)) == 3
    with torch.no_grad():
        assert run.model(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 27)

    report = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "whole" in report.stdout and "split" in report.stdout
