"""One table says what each config key is to a run (actgrad.keys); everything that asks reads it."""

from actgrad.checkpoint import run_config
from actgrad.grouping import group_key
from actgrad.keys import keys_not_in_dir_names, role


def test_the_run_dir_names_leave_out_what_the_table_says(composer):
    cfg = composer()
    from omegaconf import OmegaConf

    hydra = OmegaConf.load(__import__("conftest").ROOT / "conf" / "config.yaml").hydra
    assert sorted(hydra.job.config.override_dirname.exclude_keys) == sorted(keys_not_in_dir_names())
    assert cfg is not None


def test_a_key_takes_the_role_of_its_nearest_listed_parent():
    assert not role("callbacks.figures.every_n_steps").defines_run
    assert role("optimizer.lr").may_differ_in_stack and not role("optimizer.nesterov").may_differ_in_stack
    assert role("model.n_hidden") == role("a.key.nobody.listed")  # a plain run key: defines it, a column, a name
    assert not role("hydra.launcher.n_jobs").column and not role("data.path").in_dir_name


def test_the_hash_stacking_and_columns_follow_the_table(composer):
    base = composer()
    watched = composer("callbacks=full", "threads=2", "log_every_n_steps=10")
    assert run_config(base, "sha") == run_config(watched, "sha")  # how a run is watched is not the run
    assert run_config(base, "sha") != run_config(composer("model.n_hidden=50"), "sha")
    assert group_key(base) == group_key(composer("seed=3", "init=naive", "optimizer.lr=0.3"))
    assert group_key(base) != group_key(composer("log_every_n_steps=10"))  # one loop: one cadence
