"""actgrad: see inside a neural network while it trains.

    import actgrad
    run = actgrad.load("outputs/runs/<date>_<time>")  # a run dir (its checkpoints/last.ckpt) or a .ckpt file
    run.sample(10)
"""


def load(path, model=None, allow=()):
    """The trained run of a run dir or checkpoint file: actgrad.run.Run (model, vocab, sample ...).
    `model=mypkg.Net` (or `allow=("mypkg.",)`) lets its stored config build your own class."""
    from actgrad.run import load as load_run  # on first use: `import actgrad.checks` must not wait for torch

    return load_run(path, model=model, allow=allow)


def _show_launcher_to_hydra():
    """Hydra finds launcher plugins by listing the folders of the `hydra_plugins` namespace; an
    editable install (`pip install -e .`) serves ours through an import hook instead, which that
    listing misses. Put its folder on sys.path then, so `hydra/launcher=stacked` is found."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.find_spec("hydra_plugins.actgrad_launcher")
    if spec is None or not spec.origin:
        return
    root = Path(spec.origin).parent.parent  # .../hydra_plugins
    import hydra_plugins

    if str(root) not in list(hydra_plugins.__path__):
        sys.path.append(str(root.parent))


_show_launcher_to_hydra()
