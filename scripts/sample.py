"""Sample names from a trained run, like the lecture.

    python scripts/sample.py outputs/runs/<date>_<time>/checkpoints/last.ckpt --n 20 --seed 42
"""

import argparse

import torch
from omegaconf import OmegaConf

from actgrad import checkpoint as checkpoint_file
from actgrad.data import VOCAB
from actgrad.experiment import build


def load(checkpoint_path):
    """Rebuild the run's model from the config stored in its checkpoint, with the trained weights."""
    checkpoint = checkpoint_file.load(checkpoint_path)  # tensors and plain containers only: runs no code
    cfg = OmegaConf.create(checkpoint["hyper_parameters"])
    cfg.data.path = cfg.data.path or None
    _, module = build(cfg)
    module.load_state_dict(checkpoint["state_dict"])
    return module.net.eval(), cfg.data.block_size


@torch.no_grad()
def sample(net, block_size, n, seed):
    generator = torch.Generator().manual_seed(seed)
    names = []
    for _ in range(n):
        context, out = [0] * block_size, []
        while True:
            probs = torch.softmax(net(torch.tensor([context])), dim=-1)
            ix = torch.multinomial(probs, num_samples=1, generator=generator).item()
            if ix == 0:
                break
            out.append(VOCAB[ix])
            context = context[1:] + [ix]
        names.append("".join(out))
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2147483647)
    args = parser.parse_args()
    net, block_size = load(args.checkpoint)
    print("\n".join(sample(net, block_size, args.n, args.seed)))


if __name__ == "__main__":
    main()
