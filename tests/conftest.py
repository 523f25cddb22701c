import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
NAMES_TXT = ROOT.parent / "shared" / "data" / "names.txt"
LN_V = math.log(27)

# A run small enough for a test: seconds, not minutes.
TINY = [
    "trainer.max_steps=40",
    "steps_per_batch=10",
    "log_every_n_steps=10",
    "val_every_n_steps=20",
    "trainer.enable_progress_bar=false",
    "callbacks=none",
]


@pytest.fixture
def names_txt() -> Path:
    if not NAMES_TXT.is_file():
        pytest.skip(f"{NAMES_TXT} is absent (the lecture's data set lives in ../shared/data)")
    return NAMES_TXT


def census_sample(path: Path) -> Path:
    """300 real first names, from the package the offline fallback uses: no network, no shared/ needed."""
    from actgrad.data import census_names

    path.write_text("\n".join(census_names()[::10][:300]) + "\n")
    return path


@pytest.fixture
def small_names(tmp_path) -> Path:
    return census_sample(tmp_path / "small_names.txt")


def make_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def composer():
    """compose(*overrides) for many configs under one Hydra initialisation (much faster)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield lambda *overrides: compose(config_name="config", overrides=list(overrides))


def read_statuses(sweep_dir: Path) -> dict:
    """{job: its status.yaml} of every run under a sweep dir."""
    import yaml

    return {str(p.parent.relative_to(sweep_dir)): yaml.safe_load(p.read_text()) or {}
            for p in sorted(Path(sweep_dir).glob("**/status.yaml"))}
