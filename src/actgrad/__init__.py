"""actgrad: see inside a neural network while it trains.

    import actgrad
    run = actgrad.load("outputs/runs/<date>_<time>")  # a run dir (its checkpoints/last.ckpt) or a .ckpt file
    run.sample(10)
"""


def load(path):
    """The trained run of a run dir or checkpoint file: actgrad.run.Run (model, vocab, sample ...)."""
    from actgrad.run import load as load_run  # on first use: `import actgrad.checks` must not wait for torch

    return load_run(path)
