"""Training throughput of actgrad against a hand-written PyTorch loop of the same model.

    python scripts/bench.py --data names.txt   # 20,000 steps a run, 3 rounds
    python scripts/bench.py --steps 5000 --rounds 5
    python scripts/bench.py --variants "actgrad default"   # the hand-written eager loop and this one

Every measurement runs in a fresh process (so peak RSS is its own), one torch thread, on the
same data. Each round runs every variant once, in turn, so slow spells of a shared machine
hit all of them alike; the table gives medians over rounds and each variant's ratio against
the hand-written eager loop *of the same round*. The framework's time is that of its
training loop (validation, checkpoints and diagnostics included), the reference's that of its
loop. What callbacks do once when training ends (draw the figures, calibrate BatchNorm, save
the last checkpoint) is timed apart, reported below the table callback by callback, and the
diagnostics' cost is given both without and with it. `callbacks=full` (every diagnostic on
every step) runs a fifth of the steps.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = None  # --data: the names file every variant trains on (default: the config's data)

VARIANTS = {
    "hand-written eager": ("reference", []),
    "hand-written compiled": ("reference", ["compile"]),
    "actgrad callbacks=none": ("actgrad", ["callbacks=none"]),
    "actgrad default": ("actgrad", []),
    "actgrad callbacks=full": ("actgrad", ["callbacks=full"]),
    "actgrad compiled": ("actgrad", ["compile=true"]),
    # the levers of the fast path, each turned off alone (README, "Performance")
    "actgrad default, torch.optim.SGD": ("actgrad", ["optimizer._target_=torch.optim.SGD"]),
    # a plain Lightning callback with a step hook: every step takes Lightning's documented path
    "actgrad default, Lightning's documented path": ("actgrad", [
        "+callbacks.hook._target_=lightning.pytorch.callbacks.LambdaCallback",
        "+callbacks.hook.on_after_backward._target_=operator.is_", "+callbacks.hook.on_after_backward._partial_=true"]),
    "actgrad default, steps_per_batch=1": ("actgrad", ["steps_per_batch=1"]),
}
FEWER_STEPS = {"actgrad callbacks=full": 5}  # variant: run steps // this (enough that its fixed costs weigh as little)


def data_path():
    return DATA


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference(steps, args, device):
    """The loop a user writes in a notebook: same model, same init, same batches' shapes."""
    import torch
    import torch.nn.functional as F

    from actgrad import init
    from actgrad.data import NamesData
    from actgrad.model import MLP

    torch.manual_seed(1337)
    data = NamesData(path=data_path())
    data.prepare()
    x, y = (t.to(device).long() for t in data.splits["train"])
    net = MLP(norm=lambda n: torch.nn.BatchNorm1d(n, momentum=0.001)).to(device)
    init.kaiming(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(xb, yb):
        loss = F.cross_entropy(net(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    if "compile" in args:
        step = torch.compile(step)
        for _ in range(20):  # compile outside the timed loop
            ix = torch.randint(0, len(x), (32,), device=device)
            step(x[ix], y[ix])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        ix = torch.randint(0, len(x), (32,), device=device)
        step(x[ix], y[ix])
    sync()
    return steps / (time.perf_counter() - start)


def framework(steps, overrides, device):
    import lightning as L
    from hydra import compose, initialize_config_dir

    from actgrad.experiment import train

    from actgrad.writer import Writer

    class Clock(L.Callback):
        """The training loop's time. What the other callbacks do when training ends (draw the figures,
        calibrate BatchNorm, save the last checkpoint) is timed apart, callback by callback."""

        def on_train_start(self, trainer, module):
            self.ending, self.figures = {}, 0
            for cb in trainer.callbacks:
                if cb is not self and type(cb).on_train_end is not L.Callback.on_train_end:
                    cb.on_train_end = self.timed(type(cb).__name__, cb.on_train_end)
            self.start = time.perf_counter()

        def timed(self, name, hook):
            def run(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return hook(*args, **kwargs)
                finally:
                    self.ending[name] = self.ending.get(name, 0.0) + time.perf_counter() - start

            return run

        def on_train_end(self, trainer, module):  # the last callback: every other one's on_train_end is done
            self.seconds = time.perf_counter() - self.start - sum(self.ending.values())

    clock = Clock()
    figure = Writer.figure

    def counted(self, *args, **kwargs):
        clock.figures += 1
        return figure(self, *args, **kwargs)

    Writer.figure = counted  # this child process only: how many images the drawing time is for
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
                                           f"trainer.accelerator={device}", *overrides]
                      + ([f"data.path={data_path()}"] if data_path() else []))
    with tempfile.TemporaryDirectory() as run_dir:
        train(cfg, run_dir, extra_callbacks=[clock])
    return {"steps_per_s": steps / clock.seconds, "end_s": clock.ending, "figures": clock.figures}


def measure_one(kind, args, steps, device):
    """Runs in a child process: one measurement, printed as JSON."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    result = {"steps_per_s": reference(steps, args, device)} if kind == "reference" else framework(steps, args, device)
    print(json.dumps(result | {"steps": steps, "peak_rss_mb": peak_rss_mb()}))


def run_child(name, steps, device):
    steps = max(100, steps // FEWER_STEPS.get(name, 1))
    data = ["--data", DATA] if DATA else []
    out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps), "--device", device, *data],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="names file (data.path) of every variant; default: the config's data")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DATA
    DATA = str(Path(args.data).absolute()) if args.data else None
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        kind, extra = VARIANTS[args.child]
        return measure_one(kind, extra, args.steps, args.device)

    names = ["hand-written eager"] + [v for v in args.variants if v != "hand-written eager"]
    results = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            results[name].append(run_child(name, args.steps, args.device))
            print(f"round {r + 1}: {name}: {results[name][-1]['steps_per_s']:.0f} steps/s", file=sys.stderr)

    ref = results["hand-written eager"]
    print(f"\n{args.steps} steps a run, median of {args.rounds} rounds, device {args.device}, data "
          f"{data_path() or 'the config default'}\n")
    print("| variant | steps/s | ratio vs hand-written eager | peak RSS (MB) | RSS ratio |")
    print("|---|---|---|---|---|")
    for name in names:
        speed = statistics.median(m["steps_per_s"] for m in results[name])
        ratio = statistics.median(m["steps_per_s"] / r["steps_per_s"] for m, r in zip(results[name], ref))
        rss = statistics.median(m["peak_rss_mb"] for m in results[name])
        rss_ratio = statistics.median(m["peak_rss_mb"] / r["peak_rss_mb"] for m, r in zip(results[name], ref))
        print(f"| {name} | {speed:,.0f} | {ratio:.2f} | {rss:.0f} | {rss_ratio:.2f} |")
    def with_end(m):  # steps/s counting what the callbacks do when training ends
        return m["steps"] / (m["steps"] / m["steps_per_s"] + sum(m.get("end_s", {}).values()))

    none = results.get("actgrad callbacks=none")
    if none and "actgrad default" in results:  # the diagnostics' cost, same rounds
        default = results["actgrad default"]
        kept = statistics.median(d["steps_per_s"] / n["steps_per_s"] for d, n in zip(default, none))
        kept_end = statistics.median(with_end(d) / with_end(n) for d, n in zip(default, none))
        print(f"\ndefault diagnostics: {kept:.3f}x the steps/s of callbacks=none in the training loop ({1 - kept:.1%} slower); "
              f"{kept_end:.3f}x counting the work done when training ends ({1 - kept_end:.1%} slower)")
    if none and "actgrad callbacks=full" in results:
        full = results["actgrad callbacks=full"]
        slower = statistics.median(n["steps_per_s"] / f["steps_per_s"] for f, n in zip(full, none))
        slower_end = statistics.median(with_end(n) / with_end(f) for f, n in zip(full, none))
        print(f"callbacks=full: {slower:.2f}x slower than callbacks=none in the training loop; "
              f"{slower_end:.2f}x counting the work done when training ends")
    print("\nwhen training ends (not in steps/s), median seconds a run:")
    for name in names:
        runs = [m for m in results[name] if "end_s" in m]
        if runs:
            callbacks = {cb: statistics.median(m["end_s"].get(cb, 0.0) for m in runs) for cb in runs[0]["end_s"]}
            figures = statistics.median(m["figures"] for m in runs)
            drawing = sum(t for cb, t in callbacks.items() if "Figure" in cb)
            drawn = f"; {figures:.0f} figures, {1000 * drawing / figures:.0f} ms each" if figures else ""
            print(f"- {name} ({runs[0]['steps']} steps): " + ", ".join(f"{cb} {t:.2f}" for cb, t in callbacks.items()) + drawn)


if __name__ == "__main__":
    main()
