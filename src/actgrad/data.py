"""The names data set: where it comes from, how it becomes tensors, how batches are drawn.

As in makemore: every name becomes one example per character (its context of `block_size`
previous characters, padded with '.'), and the names are split 80/10/10 after
random.seed(split_seed); random.shuffle, exactly as the lecture. The vocabulary comes from the
data: '.' (start and end token, index 0) plus the sorted set of characters in the file, so the
lecture's names.txt gives '.' + a-z (indices 0..26) and a file of names with accents, digits or
another script (UTF-8) gives its own.

The examples are stored in the smallest integer type that holds the vocabulary (uint8 up to 256
symbols), (block_size + 1) bytes a character, and converted to int64 (what nn.Embedding and
cross_entropy take) only when a batch is drawn.
"""

import hashlib
import logging
import os
import random
import unicodedata
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tqdm import tqdm

from actgrad.checks import ConfigError

log = logging.getLogger(__name__)

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
VOCAB = "." + ALPHABET  # the lecture's vocabulary (names.txt's); a data set's own is NamesData.vocab
END = "."  # index 0 of every vocabulary: the start and end token
CENSUS = "census-1990-first-names"
# Peak bytes of preparing per byte of the file, besides the examples' (block_size + 1): a Python
# string per name (~60 bytes) and the lists that hold them, so files of shorter names take more.
# Sized with scripts/bench_data.py (docs/performance.md): between census names and names of 2-3 letters.
PREPARE_BYTES_PER_BYTE = 20


class DataError(ConfigError):
    """A data file or setting we cannot use; the message says which and why."""


@dataclass
class Words:
    words: list[str]  # the names, in the file's order
    name: str  # where they came from, recorded in the run's hyperparameters
    sha256: str
    vocab: str = VOCAB  # '.' and the sorted characters of the names: index i is vocab[i]

    @property
    def count(self) -> int:
        return len(self.words)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def index_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type (of those torch has too) that holds every index of the vocabulary."""
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"a vocabulary of {vocab_size} symbols is too big")


def available_memory() -> int | None:
    """Bytes of memory the kernel can still give (MemAvailable); None where there is no /proc/meminfo."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(path: Path, block_size: int) -> None:
    """Refuse a file too big for this machine before reading it, rather than die of a MemoryError midway."""
    available = available_memory()
    size = path.stat().st_size
    needed = size * (PREPARE_BYTES_PER_BYTE + block_size + 1)
    if available is not None and needed > available:
        raise DataError(
            f"data.path={path}: a file of {size / 1e6:.1f} MB needs about {needed / 1e9:.1f} GB of memory to "
            f"prepare (block_size={block_size}) but {available / 1e9:.1f} GB is available; "
            f"give a smaller file or use a machine with more memory"
        )


def read_words(path: Path, block_size: int = 3) -> list[str]:
    """The names of a file, one a line (UTF-8): lines stripped, blank ones dropped.

    A file we cannot use (binary, not UTF-8, fewer than 10 names, a name with '.' or a control
    character) is a one-line DataError, not a silent fix. block_size is the context the names
    will be prepared for: it sizes the memory check.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data.path={path}: is a directory, not a file (give a text file with one name per line)")
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file (give a text file with one name per line)")
    check_memory(path, block_size)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a BOM some editors put first is not part of a name
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.path={path}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    if "\x00" in text:
        raise DataError(f"data.path={path}: is a binary file, not one name per line")
    words = [w for w in map(str.strip, text.splitlines()) if w]
    check_names(path, words)
    return words


def check_names(path: Path, words: list[str]) -> None:
    """One line naming the first name with '.' (the end token) or a control character, or too few names."""
    def first_with(c):
        return next(w for w in words if c in w)

    chars = vocab_of(words)[1:]
    if END in chars:
        raise DataError(f"data.path={path}: name {first_with(END)!r} has '.', the start and end token of "
                        f"every name; remove or replace it")
    for c in chars:
        if not c.isspace() and unicodedata.category(c) == "Cc":  # a tab or a space inside a name is kept
            raise DataError(f"data.path={path}: name {first_with(c)!r} has the control character {c!r}; "
                            f"give plain text, one name per line")
    if len(words) < 10:
        raise DataError(f"data.path={path}: has {len(words)} names; at least 10 are needed for an 80/10/10 split")


def vocab_of(words: list[str]) -> str:
    """'.' and the distinct characters of the names, sorted by code point."""
    return END + "".join(sorted(set("".join(words))))


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


def load_words(path: str | None, cache_dir: str, url: str = NAMES_URL, block_size: int = 3) -> Words:
    """data.path if set; else a cached names.txt; else a download; else the census fallback."""
    if path:
        path = Path(path).expanduser()
        return words_of_file(path, str(path), block_size)
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
            sha256 = hashlib.sha256("\n".join(words).encode()).hexdigest()
            return Words(words, CENSUS, sha256, vocab_of(words))
    return words_of_file(cached, "names.txt", block_size)


def words_of_file(path: Path, name: str, block_size: int) -> Words:
    words = read_words(path, block_size)
    return Words(words, name, sha256_of(path), vocab_of(words))


def split_words(words: list[str], seed: int) -> dict[str, list[str]]:
    """80/10/10 split of the names after random.seed(seed); shuffle, exactly as the lecture."""
    words = list(words)
    random.seed(seed)
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}


def build_examples(words: list[str], block_size: int, vocab: str = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (context, next character) pair of every word, as in makemore, in a compact integer type.

    vocab: the symbols, index order ('.' first); the lecture's '.' + a-z by default."""
    y = encode(words, vocab)
    return torch.from_numpy(context_windows(y, block_size)), torch.from_numpy(y)


def encode(words: list[str], vocab: str = VOCAB) -> np.ndarray:
    """The words one after another, each ended by '.', as vocabulary indices: the targets of their examples."""
    text = "\n".join(words) + "\n" if words else ""
    unknown = set(text) - set(vocab[1:]) - {"\n"}
    if unknown:
        raise ValueError(f"a word has {''.join(sorted(unknown))!r}, outside the vocabulary {vocab!r}")
    table = np.zeros(ord(max(vocab)) + 1, index_dtype(len(vocab)))  # code point -> index; '\n' -> 0, the '.'
    table[[ord(c) for c in vocab[1:]]] = np.arange(1, len(vocab))
    return table[np.frombuffer(text.encode("utf-32-le"), "<u4")]


def context_windows(y: np.ndarray, block_size: int) -> np.ndarray:
    """x[p] = the block_size indices before position p within its own word, padded with 0 ('.').

    Column by column, not character by character: the column d characters back is the one
    d - 1 back shifted down a row, and 0 where the previous character ended a word ('.' is 0,
    so each word starts from a context of '.' again).
    """
    x = np.zeros((len(y), block_size), y.dtype)
    within_word = y[:-1] != 0
    previous = y  # 0 characters back: the targets themselves
    for column in reversed(range(block_size)):
        np.multiply(previous[:-1], within_word, out=x[1:, column])
        previous = x[:, column]
    return x


class RandomBatches:
    """Chunks of random minibatches, drawn from in-memory tensors, one chunk per Lightning batch.

    The minibatch of optimizer step s depends only on (seed, s), so a run resumed at any
    step, or chunked differently, sees exactly the batches of an uninterrupted run. A chunk
    is `steps_per_batch` steps, cut short at the next multiple of any of `cadences` (logging,
    validation, checkpoints), so those land on their exact steps whatever step a run resumed from.
    """

    def __init__(self, x, y, batch_size, steps_per_batch, max_steps, seed, first_step=lambda: 0, cadences=()):
        self.x, self.y = x, y
        self.batch_size, self.steps_per_batch, self.max_steps = batch_size, steps_per_batch, max_steps
        self.seed, self.first_step, self.cadences = seed, first_step, (steps_per_batch, *cadences)
        self.generator = torch.Generator()

    def indices(self, step: int) -> torch.Tensor:
        self.generator.manual_seed(self.seed * 1_000_003 + step)
        return torch.randint(0, len(self.x), (self.batch_size,), generator=self.generator)

    def chunks(self, start: int):
        """(first step, end step) of each chunk from `start` to max_steps."""
        while start < self.max_steps:
            end = min(self.max_steps, *((start // n + 1) * n for n in self.cadences))
            yield start, end
            start = end

    def __len__(self):
        return sum(1 for _ in self.chunks(self.first_step()))

    # Lightning asks loaders for their position to resume mid-epoch; ours is the global step
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        for first, end in self.chunks(self.first_step()):
            ix = torch.stack([self.indices(t) for t in range(first, end)])
            # stored compact; the model takes int64, so convert only the chunk drawn
            yield self.x[ix].long(), self.y[ix].long()


class NamesData(L.LightningDataModule):
    def __init__(self, path=None, cache_dir="~/.cache/actgrad", block_size=3, batch_size=32, split_seed=42,
                 url=NAMES_URL, train_examples=None):
        super().__init__()
        if block_size < 1:
            raise DataError(f"data.block_size={block_size}: must be a positive whole number")
        if batch_size < 1:
            raise DataError(f"data.batch_size={batch_size}: must be a positive whole number")
        if train_examples is not None and (not isinstance(train_examples, int) or train_examples < 1):
            raise DataError(f"data.train_examples={train_examples!r}: must be a positive whole number, or null for all")
        self.train_examples = train_examples  # the first n of the training split only (debug=overfit)
        self.path, self.cache_dir, self.url = path, cache_dir, url
        self.block_size, self.batch_size, self.split_seed = block_size, batch_size, split_seed
        # loop settings, set by the trainer side (actgrad.experiment) before fit
        self.steps_per_batch, self.max_steps, self.seed, self.cadences = 1, 1, 0, ()
        self.words = None

    def prepare(self) -> None:
        """Load the words and build all three splits once; idempotent."""
        if self.words is not None:
            return
        self.words = load_words(self.path, self.cache_dir, self.url, self.block_size)
        self.splits = {split: build_examples(names, self.block_size, self.words.vocab)
                       for split, names in split_words(self.words.words, self.split_seed).items()}

    @property
    def vocab(self) -> str:
        """The symbols of the data, in index order: '.' (start and end token) and the sorted characters of the names."""
        self.prepare()
        return self.words.vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def setup(self, stage=None):
        self.prepare()

    def describe(self) -> dict:
        """What identifies the data set in the run's hyperparameters."""
        self.prepare()
        return {"name": self.words.name, "words": self.words.count, "sha256": self.words.sha256,
                **{f"{k}_examples": len(v[1]) for k, v in self.splits.items()}}

    def train_dataloader(self):
        x, y = self.splits["train"]
        if self.train_examples:  # a few examples seen over and over: the loss must fall towards its floor
            x, y = x[: self.train_examples], y[: self.train_examples]
        return RandomBatches(x, y, self.batch_size, self.steps_per_batch, self.max_steps, self.seed,
                             first_step=lambda: self.trainer.global_step if self.trainer else 0, cadences=self.cadences)
    # no val or test loaders: the module evaluates whole splits itself, at exact steps (module.py)
