"""The names data set: where it comes from, how it becomes tensors, how batches are drawn.

As in makemore: the vocabulary is '.' (start and end token, index 0) plus a-z, every name
becomes one example per character (its context of `block_size` previous characters, padded
with '.'), and the *names* are split 80/10/10 after a seeded shuffle.

Preparing scales to files of hundreds of MB: the names stay one text (no Python string per
name), the examples are made with array operations, column by column, and stored in the
smallest integer type that holds the vocabulary (uint8 for 27 symbols): (block_size + 1)
bytes per character of the file, not 8x that in int64. Training batches are converted to
int64 (what nn.Embedding and cross_entropy take) only when drawn.
"""

import functools
import hashlib
import logging
import math
import os
import random
import re
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
VOCAB = "." + ALPHABET  # index 0 is the start/end token
STOI = {ch: i for i, ch in enumerate(VOCAB)}
CENSUS = "census-1990-first-names"
LETTERS = ALPHABET.encode()
NOT_IN_VOCAB = 255
# byte -> vocabulary index, for bytes.translate: a line end ends a name as '.' does; anything else is NOT_IN_VOCAB
ENCODE = bytes(0 if chr(b) in "\r\n" else STOI.get(chr(b), NOT_IN_VOCAB) for b in range(256))
# Peak memory of preparing, per byte of the file, besides the examples ((block_size + 1) bytes a
# character): the text and its codes, where each name starts and its size (16 bytes a name), and
# the shuffle's arrays (~30 bytes a name at their peak). scripts/bench_data.py measures 5.0 on
# 200 MB of census names (~7 bytes a name) at block_size 3 and 8; files of shorter names take more.
PREPARE_BYTES_PER_BYTE = 8


class DataError(ValueError):
    """A data file or setting we cannot use; the message says which and why."""


@dataclass
class Words:
    text: bytes  # the names, one a line, only a-z: a list of str would take ~10x the file
    name: str  # where they came from, recorded in the run's hyperparameters
    sha256: str
    count: int

    @property
    def words(self) -> list[str]:
        return self.text.decode("ascii").split()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # in chunks: a big file is not held twice
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


def memory_needed(file_size: int, block_size: int) -> int:
    """Estimated peak bytes of preparing a names file of file_size bytes (the interpreter and torch aside)."""
    examples = (block_size + 1) * index_dtype(len(VOCAB)).itemsize  # per character, all splits together
    return file_size * (PREPARE_BYTES_PER_BYTE + examples)


def check_memory(path: Path, block_size: int) -> None:
    """Refuse a file too big for this machine before reading it, rather than die of a MemoryError midway."""
    available = available_memory()
    if available is None:
        return
    size = path.stat().st_size
    needed = memory_needed(size, block_size)
    if needed > available:
        raise DataError(
            f"data.path={path}: a file of {size / 1e6:.1f} MB needs about {needed / 1e9:.1f} GB of memory to "
            f"prepare (block_size={block_size}) but {available / 1e9:.1f} GB is available; "
            f"give a smaller file or use a machine with more memory"
        )


def read_names(path: Path, block_size: int = 3) -> tuple[bytes, int]:
    """(text, count): the names of a file, one a line, lower-case a-z; anything else is a clear error, not a silent fix.

    block_size is the context the names will be prepared for: it sizes the memory check.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data.path={path}: is a directory, not a file (give a text file with one name per line)")
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file (give a text file with one name per line)")
    check_memory(path, block_size)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise DataError(f"data.path={path}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    if text.translate(None, LETTERS + b"\r\n"):  # more than a-z and line ends: spaces to strip, or an error
        words = checked_words(path, text)
        text, count = "\n".join(words).encode(), len(words)
    else:
        count = count_names(text)
    if count < 10:
        raise DataError(f"data.path={path}: has {count} names; at least 10 are needed for an 80/10/10 split")
    return text, count


def count_names(text: bytes) -> int:
    """The runs of letters in a text of a-z and line ends."""
    if b"\r" not in text and b"\n\n" not in text and not text.startswith(b"\n"):  # one name a line: count lines
        return text.count(b"\n") + (not text.endswith(b"\n")) if text else 0
    letter = np.frombuffer(text, np.uint8) >= ord("a")
    return int(letter[:1].sum() + np.count_nonzero(letter[1:] & ~letter[:-1]))


def read_words(path: Path, block_size: int = 3) -> list[str]:
    """The names of a file as a list (read_names checks them)."""
    return read_names(path, block_size)[0].decode("ascii").split()


def checked_words(path: Path, raw: bytes) -> list[str]:
    """The names of a file with more than a-z and line ends: its stripped lines, or the first bad one named."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.path={path}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    if "\x00" in text:
        raise DataError(f"data.path={path}: is a binary file, not one name per line")
    words = [w for w in map(str.strip, text.splitlines()) if w]
    joined = "\n".join(words)
    bad = re.search(r"[^a-z\n]", joined)  # one regex over the whole text, not a set per name
    if bad:
        w = words[joined.count("\n", 0, bad.start())]
        raise DataError(
            f"data.path={path}: name {w!r} has {''.join(sorted(set(w) - set(ALPHABET)))!r}; accepted characters are a-z"
        )
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
            text = "\n".join(words).encode()
            return Words(text, CENSUS, hashlib.sha256(text).hexdigest(), len(words))
    return words_of_file(cached, "names.txt", block_size)


def words_of_file(path: Path, name: str, block_size: int) -> Words:
    text, count = read_names(path, block_size)
    return Words(text, name, sha256_of(path), count)


def build_examples(words: list[str], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (context, next character) pair of every word (a-z), as in makemore, in a compact integer type."""
    y = encode(words)
    return torch.from_numpy(context_windows(y, block_size)), torch.from_numpy(y)


def encode(words: list[str]) -> np.ndarray:
    """The words one after another, each ended by '.', as vocabulary indices: the targets of their examples."""
    text = ("\n".join(words) + "\n").encode("ascii") if words else b""
    codes = np.frombuffer(text.translate(ENCODE), np.uint8)
    if (codes == NOT_IN_VOCAB).any():
        raise ValueError(f"a word has a character outside the vocabulary {VOCAB!r}")
    return codes.astype(index_dtype(len(VOCAB)))


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


def split_words(words: list[str], seed: int) -> dict[str, list[str]]:
    """80/10/10 split of the names after random.seed(seed); shuffle, exactly as the lecture."""
    words = list(words)
    random.seed(seed)
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}


def prepare_splits(text: bytes, seed: int, block_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """build_examples of each split of split_words(names, seed), from the names' text (names one a line, a-z).

    The same examples, made from arrays: no Python string per name (~60 bytes each), and the
    shuffle's order computed with array operations (lecture_order).
    """
    codes, starts, sizes = name_codes(text)
    order = lecture_order(len(starts), seed)
    n1, n2 = int(0.8 * len(order)), int(0.9 * len(order))
    splits = {}
    for split, part in ("train", order[:n1]), ("val", order[n1:n2]), ("test", order[n2:]):
        y = gather_names(codes, starts, sizes, part)
        splits[split] = torch.from_numpy(context_windows(y, block_size)), torch.from_numpy(y)
    return splits


def name_codes(text: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, starts, sizes): the text as vocabulary indices, line ends as 0 (the end token '.'),
    where each name starts in codes, and its size with the 0 that ends it."""
    if text and text[-1] not in b"\r\n":
        text += b"\n"  # the last name too is followed by a 0
    codes = np.frombuffer(text.translate(ENCODE), np.uint8).astype(index_dtype(len(VOCAB)), copy=False)
    ends = np.flatnonzero(codes == 0)  # the 0 after each name, and those of empty lines and of \r\n's \n
    starts = np.zeros_like(ends)
    np.add(ends[:-1], 1, out=starts[1:])  # a name starts just after the previous 0
    sizes = ends  # in place: these arrays are 8 bytes a name
    sizes -= starts
    sizes += 1
    if not (sizes > 1).all():  # drop the empty lines
        names = sizes > 1
        starts, sizes = starts[names], sizes[names]
    return codes, starts, sizes


def gather_names(codes: np.ndarray, starts: np.ndarray, sizes: np.ndarray, order: np.ndarray,
                 chunk: int = 1 << 16) -> np.ndarray:
    """The codes of the names order[0], order[1], ..., one after another, each with its ending 0."""
    out = np.empty(int(sizes[order].sum()), codes.dtype)
    at = 0
    for i in range(0, len(order), chunk):  # a chunk of names at a time: the gather index is 8 bytes a character
        names = order[i:i + chunk]
        first, size = starts[names], sizes[names]
        total = int(size.sum())
        # each output position comes from its name's start plus its place within the name
        source = np.repeat(first - (np.cumsum(size) - size), size) + np.arange(total)
        out[at:at + total] = codes[source]
        at += total
    return out


def lecture_order(n: int, seed: int) -> np.ndarray:
    """The order split_words puts n names in (random.seed(seed); random.shuffle), as an array of indices.

    Computed with array operations from the same random numbers (shuffle_order): random.shuffle
    takes ~1 s per million names. Leaves the global random state where split_words leaves it.
    """
    if n >= 2**32 or not shuffle_order_is_exact():  # a Python whose shuffle draws differently: the lecture's loop
        order = list(range(n))
        random.seed(seed)
        random.shuffle(order)
        return np.array(order, dtype=np.int64)
    order, draws = shuffle_order(n, random.Random(seed))
    random.seed(seed)
    skip_draws(random, draws)
    return order


def shuffle_order(n: int, rng: random.Random) -> tuple[np.ndarray, int]:
    """(order, draws): rng.shuffle(x) of n items puts x[order[p]] at position p; it takes `draws` 32-bit numbers."""
    swaps, draws = shuffle_swaps(n, rng)
    return apply_swaps(swaps), draws


class RandomWords:
    """The 32-bit numbers of a random.Random, in the order its getrandbits(k <= 32) calls use them.

    getrandbits(32 * m) is m of them at once, the first in the lowest bits.
    """

    def __init__(self, rng: random.Random, block: int = 1 << 20):
        self.rng, self.block = rng, block
        self.buffer, self.position, self.used = np.empty(0, np.uint32), 0, 0

    def peek(self, m: int) -> np.ndarray:
        if self.position + m > len(self.buffer):
            more = max(m, self.block)
            fresh = np.frombuffer(self.rng.getrandbits(32 * more).to_bytes(4 * more, "little"), "<u4")
            self.buffer, self.position = np.concatenate([self.buffer[self.position:], fresh]), 0
        return self.buffer[self.position:self.position + m]

    def advance(self, m: int) -> None:
        self.position += m
        self.used += m


def skip_draws(rng, draws: int, block: int = 1 << 20) -> None:
    """Advance rng (random.Random or the random module) by `draws` 32-bit numbers."""
    for start in range(0, draws, block):
        rng.getrandbits(32 * min(block, draws - start))


def shuffle_swaps(n: int, rng: random.Random) -> tuple[np.ndarray, int]:
    """swaps[i] = the j of random.shuffle's swap (i, j), for i = n-1 down to 1 (swaps[0] = 0); and the draws used.

    shuffle draws j = _randbelow(i + 1): the top k bits of a 32-bit number, k = (i + 1).bit_length(),
    drawn again while >= i + 1. Whether a number is kept depends on how many were kept before it
    (the bound drops by one each time), so numbers are taken a block at a time: those far below
    the bound are kept whatever came before, those above it are not, and the few in between
    are settled one by one in Python.
    """
    swaps = np.zeros(n, np.int64 if n > 2**31 else np.int32)
    words = RandomWords(rng)
    bound = n  # i + 1 of the next swap
    while bound >= 2:
        k = bound.bit_length()
        left = bound - (1 << (k - 1)) + 1  # swaps left whose bound has k bits
        size = max(64, 8 * math.isqrt(1 << k))  # ~64 unsure numbers a block
        r = (words.peek(size) >> (32 - k)).astype(np.int64)
        kept = r < bound - size
        kept_before = np.cumsum(kept) - kept
        extra = 0  # unsure numbers kept so far
        for t in np.flatnonzero((r >= bound - size) & (r < bound)).tolist():
            if r[t] < bound - kept_before[t] - extra:
                kept[t] = True
                extra += 1
        hits = np.flatnonzero(kept)[:left]
        swaps[bound - 1 - np.arange(len(hits))] = r[hits]
        bound -= len(hits)
        words.advance(int(hits[-1]) + 1 if len(hits) == left else size)
    return swaps, words.used


def apply_swaps(swaps: np.ndarray) -> np.ndarray:
    """order[p] = the item at position p after the swaps (i, swaps[i]) for i = n-1 down to 1, as arrays.

    Step i puts at position i, for good, what position swaps[i] held just before it: what the
    latest earlier step i' > i that targeted the same position brought there (or the original
    item). Step i' brought what position i' held just before step i', and so on: a chain of
    increasing steps, followed by pointer jumping (a few gathers) instead of one swap at a time.
    """
    n = len(swaps)
    # the steps of each target position, in increasing order (torch's stable sort is ~4x numpy's)
    targets, steps = (t.numpy() for t in torch.sort(torch.from_numpy(swaps), stable=True))
    steps = steps.astype(swaps.dtype)
    same = targets[1:] == targets[:-1]
    starts = np.ones(n, bool)
    starts[1:] = ~same
    first = np.full(n, -1, swaps.dtype)  # first[p]: the first step that targets position p
    first[targets[starts]] = steps[starts]
    del targets, starts
    later = np.full(n, -1, swaps.dtype)  # later[i]: the next step i' > i with the same target
    later[steps[:-1][same]] = steps[1:][same]
    del steps, same
    index = np.arange(n, dtype=swaps.dtype)
    # held[p]: the step that last brought something to position p before step p; p itself if none
    held = np.where(swaps == index, later, first)
    del first
    held = np.where(held >= 0, held, index)
    del index
    follow_to_ends(held)  # held[p]: the original item at position p just before step p
    return np.where(later >= 0, held[np.maximum(later, 0)], swaps)


def follow_to_ends(chain: np.ndarray) -> None:
    """chain[p] = the end of p -> chain[p] -> chain[chain[p]] -> ... (ends point to themselves), in place.

    Pointer jumping: every round halves the chains; only the entries not yet at an end are gathered again.
    """
    active = np.arange(len(chain))
    while len(active):
        now = chain[active]
        jumped = chain[now]
        moved = jumped != now
        chain[active] = jumped
        active = active[moved]


@functools.cache
def shuffle_order_is_exact() -> bool:
    """Does shuffle_order reproduce this Python's random.shuffle? Checked once, on 1000 items."""
    expected = list(range(1000))
    random.Random(0).shuffle(expected)
    return shuffle_order(1000, random.Random(0))[0].tolist() == expected


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
                 url=NAMES_URL):
        super().__init__()
        if block_size < 1:
            raise DataError(f"data.block_size={block_size}: must be a positive whole number")
        if batch_size < 1:
            raise DataError(f"data.batch_size={batch_size}: must be a positive whole number")
        self.path, self.cache_dir, self.url = path, cache_dir, url
        self.block_size, self.batch_size, self.split_seed = block_size, batch_size, split_seed
        self.vocab_size = len(VOCAB)
        # loop settings, set by the trainer side (actgrad.experiment) before fit
        self.steps_per_batch, self.max_steps, self.seed, self.cadences = 1, 1, 0, ()
        self.words = None

    def prepare(self) -> None:
        """Load the words and build all three splits once; idempotent."""
        if self.words is not None:
            return
        self.words = load_words(self.path, self.cache_dir, self.url, self.block_size)
        self.splits = prepare_splits(self.words.text, self.split_seed, self.block_size)

    def setup(self, stage=None):
        self.prepare()

    def describe(self) -> dict:
        """What identifies the data set in the run's hyperparameters."""
        self.prepare()
        return {"name": self.words.name, "words": self.words.count, "sha256": self.words.sha256,
                **{f"{k}_examples": len(v[1]) for k, v in self.splits.items()}}

    def train_dataloader(self):
        x, y = self.splits["train"]
        return RandomBatches(x, y, self.batch_size, self.steps_per_batch, self.max_steps, self.seed,
                             first_step=lambda: self.trainer.global_step if self.trainer else 0, cadences=self.cadences)
    # no val or test loaders: the module evaluates whole splits itself, at exact steps (module.py)
