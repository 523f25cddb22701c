"""What `actgrad.callbacks.default()` costs in a plain Lightning Trainer, on models of a user's.

    python scripts/bench_callbacks.py                       # 3 rounds; both models; actgrad's own MLP too
    python scripts/bench_callbacks.py --rounds 5 --no-actgrad

Two small image classifiers trained by the user's own LightningModule (a CNN whose step takes about
1 ms on one core, one of about 10 ms), each with and without the default bundle at its default
cadences, each run in a fresh process with one torch thread. Each round runs every variant once, in
turn, so slow spells of a shared machine hit them alike; the ratio is steps/s with the bundle over
steps/s without it *in the same round*, median over rounds. Steps/s is the training loop's, from the
end of the first `--warmup` steps to the last step's end; what the bundle does when training ends
(figures, BatchNorm calibration) is reported apart. actgrad's own MLP figure is scripts/bench.py's
"actgrad default" against "actgrad callbacks=none", run the same way (bench.run_child).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {  # name: (channels, image side, steps a run)
    "1 ms CNN": ((1, 4), 8, 6000),
    "10 ms CNN": ((3, 16, 32), 16, 1500),
}


def make_module(channels, side):
    """The user's LightningModule: conv-BatchNorm-ReLU blocks and a linear classifier, SGD."""
    import lightning as L
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    layers = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels[-1] * side * side, 10))

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Classifier()


def measure(model: str, with_bundle: bool, warmup: int) -> dict:
    """Runs in a child process: one training run, its steps/s and its end time, as JSON."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    import actgrad.callbacks

    torch.set_num_threads(1)
    channels, side, steps = MODELS[model]
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(1024, channels[0], side, side), torch.randint(0, 10, (1024,)))

    class Clock(L.Callback):  # in both variants: the user's own callback
        def __init__(self):
            self.times = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in (warmup, steps):
                self.times.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):  # after the bundle's (callbacks run in list order)
            self.times.append(time.perf_counter())

    clock = Clock()
    callbacks = ([actgrad.callbacks.default(num_classes=10)] if with_bundle else []) + [clock]
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=TensorBoardLogger(logs, name="", version=""),
                            accelerator="cpu", devices=1, enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False, log_every_n_steps=50)
        trainer.fit(make_module(channels, side), DataLoader(data, batch_size=32, shuffle=True))
    start, last, end = clock.times
    return {"steps_per_s": (steps - warmup) / (last - start), "end_s": end - last}


def run_child(model: str, with_bundle: bool, warmup: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", model, "--warmup", str(warmup)]
                         + (["--bundle"] if with_bundle else []), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{model} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--actgrad-steps", type=int, default=20000, help="steps of actgrad's own MLP runs (bench.py)")
    parser.add_argument("--no-actgrad", action="store_true", help="leave out actgrad's own MLP figure")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return print(json.dumps(measure(args.child, args.bundle, args.warmup)))

    sys.path.insert(0, str(HERE))
    import bench  # actgrad's own MLP, measured as bench.py measures it

    own = ["actgrad callbacks=none", "actgrad default"]
    results = {}
    for r in range(args.rounds):
        for model in MODELS:
            for with_bundle in (False, True):
                m = run_child(model, with_bundle, args.warmup)
                results.setdefault((model, with_bundle), []).append(m)
                print(f"round {r + 1}: {model}, bundle {with_bundle}: {m['steps_per_s']:.0f} steps/s", file=sys.stderr)
        if not args.no_actgrad:
            for name in own:
                m = bench.run_child(name, args.actgrad_steps, "cpu")
                results.setdefault(name, []).append(m)
                print(f"round {r + 1}: {name}: {m['steps_per_s']:.0f} steps/s", file=sys.stderr)

    print(f"\nmedian of {args.rounds} rounds; ratio = steps/s with the bundle / without, in the same round\n")
    print("| model | step without (ms) | steps/s without | steps/s with default() | ratio | cost | end of training (s) |")
    print("|---|---|---|---|---|---|---|")
    for model in MODELS:
        without, with_ = results[(model, False)], results[(model, True)]
        speed = statistics.median(m["steps_per_s"] for m in without)
        speed_with = statistics.median(m["steps_per_s"] for m in with_)
        ratio = statistics.median(w["steps_per_s"] / o["steps_per_s"] for w, o in zip(with_, without))
        end = statistics.median(m["end_s"] for m in with_)
        print(f"| {model} | {1000 / speed:.2f} | {speed:,.0f} | {speed_with:,.0f} | {ratio:.3f} | {1 - ratio:.1%} | {end:.2f} |")
    if not args.no_actgrad:
        none, default = results[own[0]], results[own[1]]
        ratio = statistics.median(d["steps_per_s"] / n["steps_per_s"] for d, n in zip(default, none))
        print(f"| actgrad's own MLP (bench.py, {args.actgrad_steps} steps) | {1000 / statistics.median(n['steps_per_s'] for n in none):.2f} | "
              f"{statistics.median(n['steps_per_s'] for n in none):,.0f} | {statistics.median(d['steps_per_s'] for d in default):,.0f} "
              f"| {ratio:.3f} | {1 - ratio:.1%} | |")


if __name__ == "__main__":
    main()
