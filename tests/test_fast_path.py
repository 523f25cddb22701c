"""Many optimizer steps per Lightning batch is the same training as one step per batch, and as a
hand-written loop: same batches, same number of steps, same parameters, same logged steps."""

import signal

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from actgrad.data import RandomBatches
from actgrad.experiment import build, train
from actgrad.module import count_optimizer_steps

from conftest import make_config
from test_train import scalars

BASE = ["log_every_n_steps=60", "val_every_n_steps=60", "trainer.max_steps=180", "trainer.enable_progress_bar=false",
        "callbacks=none"]


def final_params(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_params(a, b, rtol=0.0, atol=0.0):
    """Bit-identical unless a tolerance is given."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol)


@pytest.mark.parametrize("norm", ["none", "batchnorm"])
def test_steps_per_batch_does_not_change_the_training(norm, small_names, tmp_path):
    runs = {}
    for k in (1, 20, 60):
        run_dir = tmp_path / f"k{k}"
        results = train(make_config(*BASE, f"steps_per_batch={k}", f"norm={norm}", f"data.path={small_names}"), run_dir)
        assert results["steps"] == 180
        runs[k] = (final_params(run_dir), scalars(run_dir))
    for k in (20, 60):
        assert_same_params(runs[1][0], runs[k][0])
        assert runs[k][1]["train/loss"] == runs[1][1]["train/loss"]  # same steps, same values
        assert [s for s, _ in runs[k][1]["val/loss"]] == [60, 120, 180]


def test_framework_equals_a_hand_written_loop(small_names, tmp_path):
    cfg = make_config(*BASE, "steps_per_batch=20", f"data.path={small_names}")
    train(cfg, tmp_path)

    data, module = build(cfg)  # same seed: same initial weights
    net = module.net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [90], gamma=0.1)
    batches = RandomBatches(*data.splits["train"], 32, 1, 180, cfg.seed)
    for step in range(180):
        ix = batches.indices(step)
        x, y = data.splits["train"][0][ix].long(), data.splits["train"][1][ix].long()
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    ours = final_params(tmp_path)
    for name, tensor in net.state_dict().items():
        torch.testing.assert_close(ours[f"net.{name}"], tensor, rtol=1e-6, atol=1e-7)


def test_the_one_lightning_internal_still_counts_steps():
    """count_optimizer_steps writes into Lightning's loop state: if a Lightning release moves it,
    this fails here, loudly, rather than every run counting its steps wrong."""
    import lightning as L

    class FiveStepsABatch(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(self.trainer.global_step)
            count_optimizer_steps(self.trainer, 5)  # what the fast path does after a chunk of 5 steps

        def train_dataloader(self):
            return [torch.zeros(1)] * 100

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = FiveStepsABatch()
    trainer = L.Trainer(max_steps=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module)
    assert module.seen == [0, 5, 10] and trainer.global_step == 15  # and max_steps ended the run there


def test_a_run_stopped_off_a_chunk_boundary_resumes_with_exact_cadences(small_names, tmp_path):
    constant = [*BASE, "scheduler=constant", f"data.path={small_names}", "checkpoint_every_n_steps=40"]
    train(make_config(*constant, "steps_per_batch=60"), tmp_path / "whole")
    # stopped at step 30 (chunks of 30), then resumed with chunks of 70: cadences stay on their multiples
    results = train(make_config(*constant, "steps_per_batch=30"), tmp_path / "split", extra_callbacks=[StopAt(30)])
    assert results == {"status": "interrupted", "steps": 30, "signal": "SIGTERM"}
    checkpoints = Steps()
    results = train(make_config(*constant, "steps_per_batch=70"), tmp_path / "split", extra_callbacks=[checkpoints])
    assert results["steps"] == 180
    last = set(checkpoints.saved) - {60, 120}  # those two are best.ckpt, at validations
    assert last == {40, 80, 160, 180}  # last.ckpt every 40 steps (120 is both), and at the end
    assert [s for s, _ in scalars(tmp_path / "split")["val/loss"]] == [60, 120, 180]
    assert [s for s, _ in scalars(tmp_path / "split")["train/loss"]] == [60, 120, 180]
    assert_same_params(final_params(tmp_path / "whole"), final_params(tmp_path / "split"))


class StopAt(Callback):
    """Asks the run to stop, as SIGTERM would, during the chunk of steps that reaches `step`."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + len(batch[0]) >= self.step and pl_module.stop.signum is None:
            pl_module.stop.handle(signal.SIGTERM, None)


class Steps(Callback):
    """The global steps at which checkpoints were saved."""

    def __init__(self):
        self.saved = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saved.append(trainer.global_step)


@pytest.mark.slow
def test_compiled_model_trains_the_same_within_float_tolerance(small_names, tmp_path):
    base = [*BASE, "steps_per_batch=60", "trainer.max_steps=60", "scheduler=constant", f"data.path={small_names}"]
    train(make_config(*base), tmp_path / "eager")
    train(make_config(*base, "compile=true"), tmp_path / "compiled")
    assert_same_params(final_params(tmp_path / "eager"), final_params(tmp_path / "compiled"), rtol=1e-4, atol=1e-5)
