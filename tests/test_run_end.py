"""The end of a run never fails on what its own logs hold, and a failure there is recorded, never `training`."""

import json

import yaml

from actgrad import experiment, hparams
from actgrad.experiment import train

from conftest import TINY, make_config
from test_train import scalars


def status(run_dir) -> dict:
    return yaml.safe_load((run_dir / "status.yaml").read_text())


def last_attempt(run_dir) -> dict:
    return json.loads((run_dir / "attempts.jsonl").read_text().splitlines()[-1])


def test_a_resume_at_the_final_step_ends_completed_with_the_same_final_values(small_names, tmp_path):
    """Killed after its last checkpoint, before its status said so: the resume starts at the final step,
    TensorBoard's purge marker empties every tag logged only there (final/*), and the end must still
    be written, as the uninterrupted run wrote it."""
    cfg = make_config(*TINY, f"data.path={small_names}", "callbacks=default")
    run_dir = tmp_path / "run"
    first = train(cfg, run_dir)
    assert first["status"] == "completed"
    finals = {tag: points for tag, points in scalars(run_dir).items() if tag.startswith("final/")}
    assert "final/saturation/layer1" in finals and "final/test_loss" in finals
    (run_dir / "status.yaml").write_text(yaml.safe_dump({"status": "training", "from_step": 0}))
    again = train(cfg, run_dir)
    assert again["status"] == "completed" and again.get("skipped") is None
    assert again == first == status(run_dir)
    assert last_attempt(run_dir)["outcome"] == "completed"
    assert {tag: points for tag, points in scalars(run_dir).items() if tag.startswith("final/")} == finals


def boom(*args, **kwargs):
    raise RuntimeError("the end broke\nand a second line")


def test_an_exception_while_writing_the_end_fails_the_run_in_one_line(small_names, tmp_path, monkeypatch):
    cfg = make_config(*TINY, f"data.path={small_names}")
    for name, (owner, attribute) in {"write_end": (hparams, "columns"), "finish": (experiment, "finish")}.items():
        run_dir = tmp_path / name
        with monkeypatch.context() as patch:
            patch.setattr(owner, attribute, boom)
            results = train(cfg, run_dir)
        said = "writing the run's end: RuntimeError: the end broke"
        assert results["status"] == "failed" and results["error"] == said and results["steps"] == 40, name
        assert status(run_dir)["status"] == "failed" and status(run_dir)["error"] == said, name
        assert last_attempt(run_dir)["outcome"] == "failed" and last_attempt(run_dir)["error"] == said
        assert not (run_dir / ".lock").exists()
