"""The names data set: where it comes from, how it becomes tensors, how batches are drawn.

As in makemore: the vocabulary is '.' (start and end token, index 0) plus a-z, every name
becomes one example per character (its context of `block_size` previous characters, padded
with '.'), and the *names* are split 80/10/10 after a seeded shuffle.
"""

import hashlib
import logging
import os
import random
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import lightning as L
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
VOCAB = "." + ALPHABET  # index 0 is the start/end token
STOI = {ch: i for i, ch in enumerate(VOCAB)}
CENSUS = "census-1990-first-names"


class DataError(ValueError):
    """A data file or setting we cannot use; the message says which and why."""


@dataclass
class Words:
    words: list[str]
    name: str  # where they came from, recorded in the run's hyperparameters
    sha256: str


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_words(path: Path) -> list[str]:
    """One name per line, lower-case a-z; anything else is a clear error, not a silent fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file (give a text file with one name per line)")
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.path={path}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    if "\x00" in text:
        raise DataError(f"data.path={path}: is a binary file, not one name per line")
    words = [w.strip() for w in text.splitlines() if w.strip()]
    for lineno, w in enumerate(words, 1):
        bad = set(w) - set(ALPHABET)
        if bad:
            raise DataError(
                f"data.path={path}: name {w!r} has {''.join(sorted(bad))!r}; accepted characters are a-z"
            )
    if len(words) < 10:
        raise DataError(f"data.path={path}: has {len(words)} names; at least 10 are needed for an 80/10/10 split")
    return words


def download(url: str, dest: Path, sha256: str, timeout: float = 10.0) -> None:
    """Fetch url to dest with a progress bar; dest appears only once its digest is right."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
        got = sha256_of(partial)
        if got != sha256:
            raise DataError(f"download of {url} has sha256 {got}, expected {sha256}")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def census_names() -> list[str]:
    """Offline fallback: the 1990 US Census first names shipped by the PyPI package `names`."""
    folder = resources.files("names")
    words = set()
    for file in ("dist.male.first", "dist.female.first"):
        for line in folder.joinpath(file).read_text().splitlines():
            if line.strip():
                words.add(line.split()[0].lower())
    return sorted(w for w in words if set(w) <= set(ALPHABET))


def load_words(path: str | None, cache_dir: str, url: str = NAMES_URL) -> Words:
    """data.path if set; else a cached names.txt; else a download; else the census fallback."""
    if path:
        path = Path(path).expanduser()
        return Words(read_words(path), str(path), sha256_of(path) if path.is_file() else "")
    cached = Path(cache_dir).expanduser() / "names.txt"
    if not cached.is_file():
        try:
            download(url, cached, NAMES_SHA256)
        except (OSError, DataError) as e:
            log.warning(
                "names.txt unavailable (%s); using %s instead (1990 US Census first names, from the `names` "
                "package). For the lecture's data set put names.txt at %s or set data.path.",
                e, CENSUS, cached,
            )
            words = census_names()
            digest = hashlib.sha256("\n".join(words).encode()).hexdigest()
            return Words(words, CENSUS, digest)
    return Words(read_words(cached), "names.txt", sha256_of(cached))


def build_examples(words: list[str], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (context, next character) pair of every word, as in makemore."""
    xs, ys = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = STOI[ch]
            xs.append(context)
            ys.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(xs, dtype=torch.long).view(-1, block_size), torch.tensor(ys, dtype=torch.long)


def split_words(words: list[str], seed: int) -> dict[str, list[str]]:
    """80/10/10 split of the names after random.seed(seed); shuffle, exactly as the lecture."""
    words = list(words)
    random.seed(seed)
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}


class RandomBatches:
    """Chunks of `steps_per_batch` random minibatches, drawn from in-memory tensors.

    The minibatch of optimizer step s depends only on (seed, s), so a run resumed at any
    step, or chunked differently, sees exactly the batches of an uninterrupted run.
    """

    def __init__(self, x, y, batch_size, steps_per_batch, max_steps, seed, first_step=lambda: 0):
        self.x, self.y = x, y
        self.batch_size, self.steps_per_batch, self.max_steps = batch_size, steps_per_batch, max_steps
        self.seed, self.first_step = seed, first_step
        self.generator = torch.Generator()

    def indices(self, step: int) -> torch.Tensor:
        self.generator.manual_seed(self.seed * 1_000_003 + step)
        return torch.randint(0, len(self.x), (self.batch_size,), generator=self.generator)

    def __len__(self):
        return -(-(self.max_steps - self.first_step()) // self.steps_per_batch)

    def __iter__(self):
        start = self.first_step()
        for s in range(start, self.max_steps, self.steps_per_batch):
            ix = torch.stack([self.indices(t) for t in range(s, min(s + self.steps_per_batch, self.max_steps))])
            yield self.x[ix], self.y[ix]


class WholeSplit:
    """A loader of exactly one batch: the whole split."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return 1

    def __iter__(self):
        yield self.x, self.y


class NamesData(L.LightningDataModule):
    def __init__(self, path=None, cache_dir="~/.cache/actgrad", block_size=3, batch_size=32, split_seed=42,
                 url=NAMES_URL):
        super().__init__()
        if block_size < 1:
            raise DataError(f"data.block_size={block_size}: must be a positive whole number")
        if batch_size < 1:
            raise DataError(f"data.batch_size={batch_size}: must be a positive whole number")
        self.path, self.cache_dir, self.url = path, cache_dir, url
        self.block_size, self.batch_size, self.split_seed = block_size, batch_size, split_seed
        self.vocab_size = len(VOCAB)
        # loop settings, set by the trainer side (train.py) before fit
        self.steps_per_batch, self.max_steps, self.seed = 1, 1, 0
        self.words = None

    def prepare(self) -> None:
        """Load the words and build all three splits once; idempotent."""
        if self.words is not None:
            return
        self.words = load_words(self.path, self.cache_dir, self.url)
        self.splits = {
            name: build_examples(ws, self.block_size) for name, ws in split_words(self.words.words, self.split_seed).items()
        }

    def setup(self, stage=None):
        self.prepare()

    def describe(self) -> dict:
        """What identifies the data set in the run's hyperparameters."""
        self.prepare()
        return {"name": self.words.name, "words": len(self.words.words), "sha256": self.words.sha256,
                **{f"{k}_examples": len(v[1]) for k, v in self.splits.items()}}

    def train_dataloader(self):
        x, y = self.splits["train"]
        return RandomBatches(x, y, self.batch_size, self.steps_per_batch, self.max_steps, self.seed,
                             first_step=lambda: self.trainer.global_step if self.trainer else 0)

    # validation and test see their whole split as one batch: one forward pass, no collate
    def val_dataloader(self):
        return WholeSplit(*self.splits["val"])

    def test_dataloader(self):
        return WholeSplit(*self.splits["test"])
