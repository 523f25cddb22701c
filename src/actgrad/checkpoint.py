"""Checkpoints that a kill cannot tear, and finding the one to resume from."""

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write next to the target, fsync, then rename over it: a kill at any moment leaves either
    the old checkpoint or the new one, never half of one. (Lightning's own save stages the file
    in the system temp dir and moves it, which is a copy when that is another filesystem.)"""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)


def resume_path(ckpt_path, run_dir: Path) -> str | None:
    """The checkpoint to start from: ckpt_path if given, else this run directory's last.ckpt
    if an earlier, killed attempt left one (so the same command picks up where it stopped)."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if ckpt_path == "last":
        return str(last)
    if ckpt_path:
        return str(ckpt_path)
    return str(last) if last.is_file() else None


def check_compatible(path: str, module) -> int:
    """The checkpoint's global step, or a one-line ValueError if it cannot be resumed into `module`."""
    if not Path(path).is_file():
        raise ValueError(f"ckpt_path={path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"ckpt_path={path}: not a readable checkpoint ({type(e).__name__})") from None
    ours = module.state_dict()
    theirs = checkpoint.get("state_dict", {})
    for name, tensor in ours.items():
        if name not in theirs or theirs[name].shape != tensor.shape:
            got = tuple(theirs[name].shape) if name in theirs else "nothing"
            raise ValueError(f"ckpt_path={path}: is of another model: {name} is {got} there, "
                             f"{tuple(tensor.shape)} in this config")
    return checkpoint.get("global_step", 0)
