"""A real run through actgrad.experiment.train, read back with TensorBoard's own event reader."""

import math
import random

import pytest
from hydra import compose, initialize_config_dir

from actgrad.events import read as read_events
from actgrad.experiment import train

CONF = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "conf")
pytestmark = [pytest.mark.filterwarnings("ignore:The number of training batches"),
              pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec")]


def run(tmp_path, *overrides):
    tmp_path.mkdir(exist_ok=True)
    rng = random.Random(0)
    names = tmp_path / "names.txt"
    names.write_text("\n".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 7))) for _ in range(300)))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[
            "trainer.max_steps=40", "steps_per_batch=10", "log_every_n_steps=10", "val_every_n_steps=20",
            "trainer.enable_progress_bar=false", f"data.path={names}", "model.n_hidden=16", *overrides])
    assert train(cfg, tmp_path / "run")["status"] == "completed"
    return read_events(tmp_path / "run")


def layout_of(events):
    """The custom-scalars layout a run wrote."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    (config,) = events.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])


def expected_tags(n_layers, activation="tanh"):
    layers = [f"layer{i}" for i in range(1, n_layers + 1)]
    weights = ["embedding.weight", *(f"{l}.weight" for l in layers), "output.weight"]
    scalars = {"init/loss", "init/uniform_loss", "update_ratio/guide"}
    dead = ("act/dead",) if activation != "tanh" else ()  # tanh units do not die: no such tag
    scalars |= {f"{q}/{l}" for q in ("act/std", "act/saturation", *dead, "preact/std", "act_grad/std") for l in layers}
    scalars |= {f"{q}/{w}" for q in ("param_grad/std", "param_grad/data_ratio", "update_ratio") for w in weights}
    histograms = {f"{q}/{l}" for q in ("act", "preact", "act_grad") for l in layers} | {f"param_grad/{w}" for w in weights}
    images = {"figures/act", "figures/act_grad", "figures/param_grad", "figures/update_ratio"}
    return scalars, histograms, images


@pytest.mark.parametrize("norm,activation", [("batchnorm", "tanh"), ("none", "relu")])
def test_full_run_writes_every_tag(tmp_path, norm, activation):
    events = run(tmp_path, "callbacks=full", "model.n_layers=3", f"norm={norm}", f"model.activation={activation}",
                 "callbacks.figures.every_n_steps=20")
    scalars, histograms, images = expected_tags(3, activation)
    tags = events.Tags()
    assert scalars <= set(tags["scalars"]), scalars - set(tags["scalars"])
    assert activation != "tanh" or not [t for t in tags["scalars"] if t.startswith("act/dead")]
    assert not [t for t in tags["scalars"] if "/mean/" in t]  # means are opt-in (means: true)
    assert histograms == set(tags["histograms"])
    assert images == set(tags["images"])
    categories = [c.title for c in layout_of(events).category]
    assert categories == ["Loss", "Activations", "ActivationGrads", "ParamGrads", "UpdateRatio"], categories
    assert [e.step for e in events.Scalars("act/saturation/layer3")] == list(range(40))  # every step, x = step
    assert [(e.step, e.value) for e in events.Scalars("update_ratio/guide")] == [(0, -3), (39, -3)]  # once: a line
    assert events.Scalars("init/uniform_loss")[0].value == pytest.approx(math.log(11))  # '.' and a-j: ln(V)
    assert [e.step for e in events.Histograms("act_grad/layer2")] == list(range(40))
    assert [e.step for e in events.Images("figures/act")] == [0, 20, 39]  # and the last step, max_steps - 1
    assert [e.step for e in events.Images("figures/update_ratio")] == [40]


def test_default_and_none(tmp_path):
    default = run(tmp_path / "default", "callbacks=default")
    scalars, histograms, images = expected_tags(1)
    tags = default.Tags()
    assert scalars <= set(tags["scalars"]) and histograms == set(tags["histograms"])
    assert set(tags["images"]) == {"figures/act", "figures/act_grad", "figures/param_grad", "figures/update_ratio"}
    assert [e.step for e in default.Scalars("act/saturation/layer1")] == [0, 39]  # every 1000 steps, and the last
    assert [e.step for e in default.Histograms("act/layer1")] == [0, 39]
    assert [e.step for e in default.Images("figures/act")] == [0, 39]

    none = run(tmp_path / "none", "callbacks=none")
    tags = none.Tags()
    assert "train/loss" in tags["scalars"]
    assert not [t for t in tags["scalars"] if t.startswith(("init/", "act/", "preact/", "act_grad/", "param_grad/", "update_ratio/"))]
    assert not tags["histograms"] and not tags["images"]
    assert [c.title for c in layout_of(none).category] == ["Loss"]  # the loss chart only
