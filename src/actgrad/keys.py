"""What each config key is to a run, in one table: read by the config hash (checkpoint.run_config),
stacking (grouping.group_key), the HPARAMS columns (hparams.columns) and run dir names (the
`override_dirname` exclude list of conf/config.yaml, which tests/test_keys.py holds equal to this table).

A key that is not listed defines the run, is equal within a stack, is an HPARAMS column when the
command line sets it and is part of the run dir's name. A listed key covers everything below it
(`callbacks` covers `callbacks.figures.every_n_steps`); the most specific entry wins.
Nothing here imports torch: a sweep's parent process reads it.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    defines_run: bool = True  # in the config hash: a run resumes only with the same value
    may_differ_in_stack: bool = False  # members of one stacked model may hold different values
    column: bool = True  # an HPARAMS column when the command line sets it
    in_dir_name: bool = True  # in the run dir's name when the command line sets it


# how a run is watched or computed on, not what it computes
WATCHING = Role(defines_run=False, column=False)
# where a run reads or writes: never in a name or a column
WHERE = Role(defines_run=False, column=False, in_dir_name=False)
MEMBER_NUMBERS = ("lr", "momentum", "dampening", "weight_decay", "betas", "eps")  # a stack member's own optimizer numbers

KEYS = {
    "seed": Role(may_differ_in_stack=True),
    "init": Role(may_differ_in_stack=True),
    **{f"optimizer.{name}": Role(may_differ_in_stack=True) for name in MEMBER_NUMBERS},
    "callbacks": Role(defines_run=False, may_differ_in_stack=True, column=False),
    "checkpoints": WATCHING,
    "checkpoint_every_n_steps": Role(defines_run=False, may_differ_in_stack=True, column=False),
    "log_every_n_steps": WATCHING,
    "val_every_n_steps": WATCHING,
    "steps_per_batch": WATCHING,
    "threads": Role(defines_run=False, may_differ_in_stack=True, column=False),
    "jobs_per_gpu": Role(defines_run=False, may_differ_in_stack=True, column=False),
    "logger": WATCHING,
    "progress_bar": WATCHING,
    "debug": Role(column=False),
    "keep_run": Role(defines_run=False),
    "compile": Role(defines_run=False),
    "objective": Role(defines_run=False),
    "search": Role(defines_run=False),
    "ckpt_path": WHERE,
    "init_from": Role(column=False, in_dir_name=False),  # the weights a new run starts from: part of it
    "data.path": WHERE,  # the data's sha256 defines the run instead
    "data.cache_dir": WHERE,
    "data.url": WHERE,
    "trainer.enable_progress_bar": Role(defines_run=False, may_differ_in_stack=True, column=False, in_dir_name=False),
    "trainer.enable_model_summary": Role(defines_run=False),
    "trainer.accelerator": Role(defines_run=False),
    "trainer.devices": Role(defines_run=False),
    "trainer.deterministic": Role(defines_run=False),
    "hydra": Role(defines_run=False, may_differ_in_stack=True, column=False, in_dir_name=False),
}
PLAIN_PRECISION = ("32-true", "32", "64-true", "64")  # no precision plugin: no loss scaling, the fast path


def role(key: str) -> Role:
    """The role of a dotted key: its own entry, else its nearest listed parent's, else a plain run key."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        found = KEYS.get(".".join(parts[:n]))
        if found is not None:
            return found
    return Role()


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys the roles are given for."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def keys_not_in_dir_names() -> list[str]:
    """For conf/config.yaml: the keys Hydra's override_dirname leaves out."""
    return [key for key, r in KEYS.items() if not r.in_dir_name and key != "hydra"]
