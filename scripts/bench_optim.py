"""Per-step time of the makemore MLP with torch.optim.SGD against actgrad.optim.SGD (flat buffers).

    python scripts/bench_optim.py                    # 5000 steps a variant a round, 3 rounds
    python scripts/bench_optim.py --steps 20000 --rounds 5 --norm none
    python scripts/bench_optim.py --optimizer adam   # torch.optim.Adam against actgrad.optim.Adam

A step is forward + cross-entropy + clearing the gradients + backward + the optimizer update, on a
batch of 32 random examples made beforehand (no data loading), one torch thread. torch's step is
`zero_grad(set_to_none=True); backward(); step()`, ours `clear_grads(); backward(); update()`;
`step()` of ours (through torch's profiler/hook wrapper) is shown too. Every step is timed on
its own; a round runs every variant once, in an order that alternates between rounds, and
reports each variant's median step; the ratio is torch's median over ours in the same round.
"""

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F

from actgrad import optim
from actgrad.model import MLP

NORMS = {"batchnorm": lambda n: torch.nn.BatchNorm1d(n, momentum=0.001), "none": None}  # the default run: batchnorm
OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}  # conf/optimizer/*.yaml


def variants(net, name, lr):
    """{variant: one training step on (x, y)}: torch.optim.<name>, then ours with update() and with step()."""
    steps = {}
    cls = OPTIMIZERS[name]

    ref = copy.deepcopy(net)
    ref_opt = getattr(torch.optim, cls)(ref.parameters(), lr=lr)

    def torch_step(x, y):
        loss = F.cross_entropy(ref(x), y)
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()

    steps[f"torch.optim.{cls} step()"] = torch_step
    for call in ("update", "step"):
        ours = copy.deepcopy(net)
        opt = getattr(optim, cls)(ours.parameters(), lr=lr)
        update = getattr(opt, call)

        def our_step(x, y, ours=ours, opt=opt, update=update):
            loss = F.cross_entropy(ours(x), y)
            opt.clear_grads()
            loss.backward()
            update()

        steps[f"actgrad.optim.{cls} {call}()"] = our_step
    return steps


def median_step_us(step, xs, ys):
    times = []
    clock = time.perf_counter_ns
    for x, y in zip(xs, ys):
        start = clock()
        step(x, y)
        times.append(clock() - start)
    return statistics.median(times) / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--steps", type=int, default=5000, help="timed steps per variant per round (default 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed steps per variant first (default 200)")
    parser.add_argument("--norm", choices=NORMS, default="batchnorm", help="norm layer of the MLP (default batchnorm)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="which optimizer (default sgd)")
    parser.add_argument("--lr", type=float, help="learning rate (default: conf/optimizer's, 0.1 for sgd, 1e-3 for adam)")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")

    torch.set_num_threads(1)
    torch.manual_seed(1337)
    net = MLP(norm=NORMS[args.norm])
    xs = torch.randint(0, 27, (args.steps, 32, 3))
    ys = torch.randint(0, 27, (args.steps, 32))
    steps = variants(net, args.optimizer, LR[args.optimizer] if args.lr is None else args.lr)
    for step in steps.values():
        for i in range(args.warmup):
            step(xs[i % args.steps], ys[i % args.steps])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, MLP norm={args.norm}, {args.optimizer}, "
          f"{args.steps} steps x {args.rounds} rounds; median us per step (forward+backward+update)")
    names = list(steps)
    theirs, ours = names[0], names[1]
    ratios = []
    print(f"{'round':>5}  " + "  ".join(f"{n:>29}" for n in names) + f"  {'torch / ours update()':>22}")
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        medians = {name: median_step_us(steps[name], xs, ys) for name in order}
        ratios.append(medians[theirs] / medians[ours])
        print(f"{r + 1:>5}  " + "  ".join(f"{medians[n]:>29.1f}" for n in names) + f"  {ratios[-1]:>21.3f}x")
    print(f"median ratio over rounds: {statistics.median(ratios):.3f}x ({theirs} time / {ours} time)")


if __name__ == "__main__":
    main()
